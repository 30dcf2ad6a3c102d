"""Arena ratings from battles: online Elo, and the Bradley-Terry maximum-likelihood fit.

A battle is (model_a, model_b, winner) with winner "a", "b", "tie" or "both_bad"; a tie and
"both bad" each count as half a win for either side (as LMSYS's Chatbot Arena does).

Both models say P(i beats j) = 1 / (1 + 10 ** ((R_j - R_i) / 400)).

- **Elo** (`elo`) updates the two ratings after every battle, by K x (score - expected score).
  It is a running estimate: the last battles move the ratings most, so the same battles in another
  order give other ratings (see `tests/test_arena_ratings.py`). That suits players whose skill
  changes; a model's weights do not change, so the leaderboard uses the Bradley-Terry fit.
- **Bradley-Terry** (`bradley_terry`) finds the ratings that make all battles most likely at once,
  whatever their order: a logistic regression whose features are +1 for model i and -1 for model j
  and whose label is "i won". Battles are first deduplicated into counts per (i, j) pair, so the fit
  costs the number of pairs, not of battles. Newton's method solves it in a few steps.
- **Intervals** (`bootstrap`): refit on battle logs resampled with replacement; the 2.5 and 97.5
  percentiles of each model's rating give a 95% interval. Resampling battles is a multinomial draw
  over the deduplicated (pair, outcome) counts, so it is as cheap as the fit.
- **Ranks** (`ranks`): 1 + the number of models whose lower bound is above this model's upper bound;
  models whose intervals overlap share a rank.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Literal, Sequence

import numpy as np

from ..errors import UserError

Winner = Literal["a", "b", "tie", "both_bad"]
WINNERS: tuple[str, ...] = ("a", "b", "tie", "both_bad")
SCORE_A = {"a": 1.0, "b": 0.0, "tie": 0.5, "both_bad": 0.5}   # model_a's score in a battle


@dataclass(frozen=True)
class Battle:
    model_a: str
    model_b: str
    winner: Winner


@dataclass
class Rating:
    model: str
    rating: float
    lower: float | None = None     # bootstrap interval (None without bootstrap)
    upper: float | None = None
    rank: int | None = None
    battles: int = 0


def check_battles(battles: Iterable[Battle]) -> list[Battle]:
    battles = list(battles)
    for battle in battles:
        if battle.winner not in SCORE_A:
            raise UserError(f"battle winner {battle.winner!r} is not one of {WINNERS}; fix the battle log")
        if battle.model_a == battle.model_b:
            raise UserError(f"a battle of {battle.model_a!r} against itself cannot be rated; drop it from the log")
    return battles


def elo(battles: Iterable[Battle], k: float = 32.0, initial: float = 1000.0, scale: float = 400.0,
        base: float = 10.0) -> dict[str, float]:
    """Online Elo: ratings after replaying `battles` in the order given."""
    ratings: dict[str, float] = {}
    for battle in check_battles(battles):
        ra = ratings.setdefault(battle.model_a, initial)
        rb = ratings.setdefault(battle.model_b, initial)
        expected_a = 1.0 / (1.0 + base ** ((rb - ra) / scale))
        delta = k * (SCORE_A[battle.winner] - expected_a)
        ratings[battle.model_a] = ra + delta
        ratings[battle.model_b] = rb - delta
    return ratings


@dataclass
class PairCounts:
    """Battles deduplicated: for each unordered pair (i < j) that met, how each battle ended."""

    models: list[str]
    i: np.ndarray          # [P] int, index of the first model of each pair
    j: np.ndarray          # [P] int, index of the second model
    wins_i: np.ndarray     # [P] float, battles i won
    wins_j: np.ndarray     # [P] float, battles j won
    ties: np.ndarray       # [P] float, ties and "both bad"

    @property
    def score_i(self) -> np.ndarray:
        return self.wins_i + 0.5 * self.ties

    @property
    def total(self) -> np.ndarray:
        return self.wins_i + self.wins_j + self.ties


def pair_counts(battles: Sequence[Battle], models: list[str] | None = None) -> PairCounts:
    battles = check_battles(battles)
    models = models or sorted({m for b in battles for m in (b.model_a, b.model_b)})
    index = {m: n for n, m in enumerate(models)}
    table: dict[tuple[int, int], list[float]] = {}     # (i, j) -> [i wins, j wins, ties]
    for battle in battles:
        a, b = index[battle.model_a], index[battle.model_b]
        outcome = 2 if SCORE_A[battle.winner] == 0.5 else (0 if battle.winner == "a" else 1)
        if a > b:
            a, b, outcome = b, a, {0: 1, 1: 0, 2: 2}[outcome]
        table.setdefault((a, b), [0.0, 0.0, 0.0])[outcome] += 1.0
    keys = sorted(table)
    cells = np.array([table[k] for k in keys]).reshape(-1, 3)
    return PairCounts(models, np.array([k[0] for k in keys], dtype=np.int64), np.array([k[1] for k in keys], dtype=np.int64),
                      cells[:, 0], cells[:, 1], cells[:, 2])


def fit_strengths(counts: PairCounts, score_i: np.ndarray | None = None, total: np.ndarray | None = None,
                  l2: float = 1e-4, iterations: int = 100, tol: float = 1e-10) -> np.ndarray:
    """Bradley-Terry strengths theta [M] (natural-log odds, mean 0) by Newton's method.

    Maximises sum_p score_i log s(th_i - th_j) + (total - score_i) log s(th_j - th_i) - l2/2 |th|^2,
    s = sigmoid: the weighted logistic regression on features e_i - e_j. The small L2 term keeps
    the fit finite when a model won (or lost) all its battles, where the plain MLE is infinite.
    """
    score_i = counts.score_i if score_i is None else score_i     # ties count half a win
    total = counts.total if total is None else total
    m = len(counts.models)
    cells = np.concatenate([counts.i * m + counts.i, counts.j * m + counts.j, counts.i * m + counts.j,
                            counts.j * m + counts.i])
    theta = np.zeros(m)
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-(theta[counts.i] - theta[counts.j])))      # [P] P(i beats j)
        residual = score_i - total * p                                      # [P] d loglik / d(th_i - th_j)
        grad = np.bincount(counts.i, residual, m) - np.bincount(counts.j, residual, m) - l2 * theta
        w = total * p * (1.0 - p)                                           # [P] curvature per pair
        # Each pair adds w at (i,i) and (j,j) and -w at (i,j) and (j,i): one bincount over flat cells.
        hessian = np.bincount(cells, np.concatenate([w, w, -w, -w]), m * m).reshape(m, m) + l2 * np.eye(m)
        # The likelihood only sees differences: pin the mean by adding the all-ones direction.
        step = np.linalg.solve(hessian + np.ones((m, m)) / m, grad)
        theta += step
        if np.max(np.abs(step)) < tol:
            break
    return theta - theta.mean()


def to_rating(theta: np.ndarray, initial: float = 1000.0, scale: float = 400.0, base: float = 10.0) -> np.ndarray:
    """Natural-log strengths -> the Elo scale (400 points = 10:1 odds), centred on `initial`."""
    return initial + theta * scale / math.log(base)


def bootstrap(counts: PairCounts, rounds: int = 200, seed: int = 0, l2: float = 1e-4) -> np.ndarray:
    """[rounds, M] strengths, each fitted on the battles resampled with replacement."""
    # Resampling N battles with replacement = one multinomial draw over the (pair, outcome) cells.
    cells = np.concatenate([counts.wins_i, counts.wins_j, counts.ties])      # [3P]
    p, n = len(counts.i), int(cells.sum())
    rng = np.random.default_rng(seed)
    out = np.empty((rounds, len(counts.models)))
    for r in range(rounds):
        draw = rng.multinomial(n, cells / n).astype(float)
        iw, jw, tw = draw[:p], draw[p:2 * p], draw[2 * p:]
        out[r] = fit_strengths(counts, score_i=iw + 0.5 * tw, total=iw + jw + tw, l2=l2)
    return out


def ranks(lower: Sequence[float], upper: Sequence[float]) -> list[int]:
    """1 + how many models are surely better (their lower bound above this one's upper bound)."""
    lower_arr = np.asarray(lower)
    return [1 + int(np.sum(lower_arr > u)) for u in upper]


def bradley_terry(battles: Sequence[Battle], rounds: int = 200, seed: int = 0, initial: float = 1000.0,
                  scale: float = 400.0, base: float = 10.0, l2: float = 1e-4, confidence: float = 0.95
                  ) -> list[Rating]:
    """Ratings best first: the BT fit, its bootstrap interval and rank (no interval if rounds=0)."""
    battles = check_battles(battles)
    if not battles:
        raise UserError("there are no battles to rate; run `lmforge arena battle` or `lmforge arena web` first")
    counts = pair_counts(battles)
    rating = to_rating(fit_strengths(counts, l2=l2), initial, scale, base)
    played = {m: 0 for m in counts.models}
    for battle in battles:
        played[battle.model_a] += 1
        played[battle.model_b] += 1
    result = [Rating(m, float(rating[n]), battles=played[m]) for n, m in enumerate(counts.models)]
    if rounds > 0:
        samples = to_rating(bootstrap(counts, rounds, seed, l2), initial, scale, base)
        alpha = (1 - confidence) / 2
        lower, upper = np.quantile(samples, alpha, axis=0), np.quantile(samples, 1 - alpha, axis=0)
        for n, (r, rank) in enumerate(zip(result, ranks(lower, upper))):
            r.lower, r.upper, r.rank = float(lower[n]), float(upper[n]), rank
    else:
        order = sorted(result, key=lambda r: -r.rating)
        for rank, r in enumerate(order, 1):
            r.rank = rank
    return sorted(result, key=lambda r: (-r.rating, r.model))
