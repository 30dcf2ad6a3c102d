"""Arena ratings: Bradley-Terry against an independent solver, recovery of known strengths, the
bootstrap intervals' coverage, Elo's order dependence, ranks, ties and bad battles."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest
from scipy.optimize import minimize
from sklearn.linear_model import LogisticRegression

from lmforge.errors import UserError
from lmforge.eval.ratings import (Battle, bootstrap, bradley_terry, elo, fit_strengths, pair_counts, ranks,
                                  to_rating)

NAMES = ["m0", "m1", "m2", "m3", "m4"]


def synthetic_battles(strengths: np.ndarray, n: int, rng: np.random.Generator, tie_rate: float = 0.0) -> list[Battle]:
    """Battles between random pairs; i beats j with probability sigmoid(s_i - s_j)."""
    m = len(strengths)
    pairs = np.array([rng.choice(m, 2, replace=False) for _ in range(n)])
    p_first = 1.0 / (1.0 + np.exp(-(strengths[pairs[:, 0]] - strengths[pairs[:, 1]])))
    first_wins = rng.random(n) < p_first
    tie = rng.random(n) < tie_rate
    return [Battle(NAMES[i], NAMES[j], "tie" if t else ("a" if w else "b"))
            for (i, j), w, t in zip(pairs, first_wins, tie)]


def scipy_strengths(battles: list[Battle]) -> np.ndarray:
    """The same likelihood, from the raw (not deduplicated) battles, minimised by BFGS."""
    models = sorted({m for b in battles for m in (b.model_a, b.model_b)})
    index = {m: k for k, m in enumerate(models)}
    a = np.array([index[b.model_a] for b in battles])
    b = np.array([index[b.model_b] for b in battles])
    score = np.array([{"a": 1.0, "b": 0.0, "tie": 0.5, "both_bad": 0.5}[x.winner] for x in battles])

    def nll(free: np.ndarray) -> tuple[float, np.ndarray]:
        theta = np.concatenate([[0.0], free])                   # model 0 pinned at 0
        d = theta[a] - theta[b]
        loss = np.sum(np.logaddexp(0, -d) * score + np.logaddexp(0, d) * (1 - score))
        g_d = -(score - 1 / (1 + np.exp(-d)))
        grad = np.bincount(a, g_d, len(models)) - np.bincount(b, g_d, len(models))
        return loss, grad[1:]

    result = minimize(nll, np.zeros(len(models) - 1), jac=True, method="BFGS", options={"gtol": 1e-9})
    theta = np.concatenate([[0.0], result.x])
    return theta - theta.mean()


def test_bt_equals_scipy_on_the_same_likelihood():
    rng = np.random.default_rng(1)
    battles = synthetic_battles(np.array([0.0, 0.4, -0.3, 1.0, -0.8]), 2000, rng, tie_rate=0.15)
    ours = fit_strengths(pair_counts(battles), l2=0.0)
    np.testing.assert_allclose(ours, scipy_strengths(battles), atol=1e-5)


def test_bt_equals_sklearn_logistic_regression():
    """LMSYS's own recipe: features +1/-1, no intercept, (almost) no penalty; ties as half wins."""
    rng = np.random.default_rng(2)
    battles = synthetic_battles(np.array([0.2, -0.5, 0.9, 0.0]), 1500, rng, tie_rate=0.1)
    counts = pair_counts(battles)
    m = len(counts.models)
    x = np.zeros((2 * len(counts.i), m))
    rows = np.arange(len(counts.i))
    x[rows, counts.i], x[rows, counts.j] = 1.0, -1.0
    x[len(rows):] = x[:len(rows)]
    y = np.concatenate([np.ones(len(rows)), np.zeros(len(rows))])
    weight = np.concatenate([counts.score_i, counts.total - counts.score_i])
    reference = LogisticRegression(fit_intercept=False, C=1e9, tol=1e-12, max_iter=10_000)
    reference.fit(x, y, sample_weight=weight)
    theta = reference.coef_[0] - reference.coef_[0].mean()
    np.testing.assert_allclose(fit_strengths(counts, l2=0.0), theta, atol=1e-4)


def test_bt_recovers_known_strengths():
    truth = np.array([0.0, 0.5, 1.0, -0.5, -1.0])
    rng = np.random.default_rng(3)
    battles = synthetic_battles(truth, 20_000, rng)
    fitted = fit_strengths(pair_counts(battles))
    np.testing.assert_allclose(fitted, truth - truth.mean(), atol=0.06)
    # And on the Elo scale, the order is the true one.
    assert [r.model for r in bradley_terry(battles, rounds=0)] == ["m2", "m1", "m0", "m3", "m4"]


def test_bootstrap_intervals_cover_the_truth_at_about_the_nominal_rate():
    truth = np.array([0.0, 0.6, -0.4, 1.1])
    centred = truth - truth.mean()
    rng = np.random.default_rng(4)
    covered, checks, widths = 0, 0, []
    for replicate in range(60):
        battles = synthetic_battles(truth, 400, rng)
        counts = pair_counts(battles, models=NAMES[:4])
        samples = bootstrap(counts, rounds=100, seed=replicate)
        lower, upper = np.quantile(samples, 0.025, axis=0), np.quantile(samples, 0.975, axis=0)
        covered += int(np.sum((lower <= centred) & (centred <= upper)))
        checks += len(truth)
        widths.append(np.mean(upper - lower))
    coverage = covered / checks
    assert 0.86 <= coverage <= 0.99, f"95% intervals covered the truth {coverage:.1%} of the time"
    # Not trivially wide either: about 2 x 1.96 x the standard error (~0.18 log-odds with 400 battles).
    assert 0.4 < float(np.mean(widths)) < 1.0


def test_elo_depends_on_the_order_and_bt_does_not():
    battles = [Battle("x", "y", "a")] * 10 + [Battle("x", "y", "b")] * 10
    forward = elo(battles, k=32)
    backward = elo(list(reversed(battles)), k=32)
    # Same record (10-10) but x lost the last ten in one order and won them in the other.
    assert forward["x"] < 1000 < backward["x"]
    assert forward["x"] == pytest.approx(2000 - backward["x"])
    shuffled = battles[:]
    random.Random(0).shuffle(shuffled)
    bt = {r.model: r.rating for r in bradley_terry(battles, rounds=0)}
    bt_shuffled = {r.model: r.rating for r in bradley_terry(shuffled, rounds=0)}
    assert bt == pytest.approx(bt_shuffled) and bt["x"] == pytest.approx(1000.0)


def test_elo_hand_computed_update_and_settings():
    [first] = [elo([Battle("x", "y", "a")], k=32, initial=1000)]
    assert first == {"x": 1016.0, "y": 984.0}          # expected score 0.5 -> 32 x 0.5
    second = elo([Battle("x", "y", "a"), Battle("x", "y", "tie")], k=10, initial=1500)
    x1 = 1505.0
    expected = 1 / (1 + 10 ** ((1495.0 - x1) / 400))
    assert second["x"] == pytest.approx(x1 + 10 * (0.5 - expected))
    assert sum(second.values()) == pytest.approx(3000.0)   # zero-sum


def test_ties_count_as_half_wins():
    ties = [Battle("x", "y", "tie"), Battle("x", "y", "both_bad")]
    split = [Battle("x", "y", "a"), Battle("x", "y", "b")]
    np.testing.assert_allclose(fit_strengths(pair_counts(ties)), fit_strengths(pair_counts(split)))
    # 3 wins, 1 loss, 2 ties = score 4 of 6: theta_x - theta_y = log(4/2), on the Elo scale 400 log10(2).
    log = [Battle("x", "y", "a")] * 3 + [Battle("y", "x", "a")] + [Battle("y", "x", "tie")] * 2
    ratings = {r.model: r.rating for r in bradley_terry(log, rounds=0, l2=0.0)}
    assert ratings["x"] - ratings["y"] == pytest.approx(400 * math.log10(2), abs=1e-6)


def test_seat_does_not_matter_to_bt():
    one = [Battle("x", "y", "a"), Battle("x", "y", "a"), Battle("x", "y", "b")]
    other = [Battle("y", "x", "b"), Battle("x", "y", "a"), Battle("y", "x", "a")]
    np.testing.assert_allclose(fit_strengths(pair_counts(one)), fit_strengths(pair_counts(other)))


def test_ranks_by_non_overlapping_intervals():
    # a: [10, 20], b: [15, 25] overlaps a, c: [0, 5] is below both.
    assert ranks(lower=[15, 10, 0], upper=[25, 20, 5]) == [1, 1, 3]
    rated = bradley_terry([Battle("x", "y", "a")] * 40 + [Battle("x", "y", "b")] * 5
                          + [Battle("y", "z", "a"), Battle("y", "z", "b")] * 20, rounds=100)
    by_name = {r.model: r for r in rated}
    assert by_name["x"].rank == 1 and by_name["x"].lower > by_name["y"].upper
    assert by_name["y"].rank == by_name["z"].rank == 2          # y and z are even: they share a rank


def test_a_model_that_always_wins_gets_a_finite_rating():
    rated = bradley_terry([Battle("x", "y", "a")] * 30, rounds=20)
    assert all(math.isfinite(r.rating) and math.isfinite(r.lower) for r in rated)
    assert rated[0].model == "x" and rated[0].rating > 1300


def test_to_rating_scale():
    np.testing.assert_allclose(to_rating(np.array([math.log(10), 0.0]), initial=1000), [1400.0, 1000.0])


@pytest.mark.parametrize("battle, match", [(Battle("x", "x", "a"), "against itself"),
                                           (Battle("x", "y", "left"), "not one of")])
def test_bad_battles_are_user_errors(battle, match):
    with pytest.raises(UserError, match=match):
        bradley_terry([battle])
    with pytest.raises(UserError, match=match):
        elo([battle])


def test_no_battles_is_a_user_error():
    with pytest.raises(UserError, match="no battles"):
        bradley_terry([])
