"""`metric: math_verify`: symbolic answers compared with math-verify, by hand, through a user task YAML
and the task runner, off the main thread, and with a clear error when math-verify is missing."""
from __future__ import annotations

import json
import signal
import sys
import threading

import pytest

from lmforge.errors import UserError
from lmforge.eval import metrics as M

import math_verify  # noqa: E402,F401  (in the test extra: missing is a failure, not a skip)
pytestmark = pytest.mark.usefixtures("one_thread")

# (the model's answer, the reference), each checked by hand.
EQUAL = [
    ("0.5", "1/2"),
    ("\\frac{1}{2}", "0.5"),
    ("1/2", "\\frac{1}{2}"),
    ("The answer is \\boxed{\\frac{3}{4}}.", "0.75"),
    ("$(x+1)^2$", "x^2+2x+1"),
    ("x^2+2x+1", "(x+1)^2"),                  # a bare answer with a variable: read as LaTeX
    ("2x+2", "2(x+1)"),                       # math-verify's plain reading of "2x+2" is only "2"
    ("\\sqrt{2}/2", "1/\\sqrt{2}"),
    ("1,000", "1000"),
    ("so the total is 17 apples", "17"),
]
DIFFERENT = [
    ("0.333", "1/3"),                         # equal to 3 decimals, not to 6
    ("\\frac{3}{4}", "0.7"),
    ("x^2+1", "(x+1)^2"),
    ("2x+2", "2(x+2)"),
    ("$x$", "y"),                             # strict: variables matter
    ("3", "4"),
    ("the answer is unclear", "7"),
    ("", "1"),
    (None, "1"),                              # the extractor found nothing
]


@pytest.mark.parametrize("answer, reference", EQUAL)
def test_symbolically_equal_answers_match(answer, reference):
    assert M.math_verify_match(answer, reference) == 1.0


@pytest.mark.parametrize("answer, reference", DIFFERENT)
def test_different_answers_do_not_match(answer, reference):
    assert M.math_verify_match(answer, reference) == 0.0


def test_exact_match_would_have_missed_them():
    # What math_verify adds: none of these is an exact (numeric) match.
    missed = [(a, r) for a, r in EQUAL if M.exact_match(a, r) == 0.0]
    assert len(missed) >= 7


def test_runs_off_the_main_thread_and_leaves_an_armed_alarm_alone():
    results: dict[str, float] = {}
    errors: list[BaseException] = []

    def work() -> None:
        try:
            assert M._alarm_timeout(5) is None               # signal.alarm is main-thread only
            results["frac"] = M.math_verify_match("\\frac{1}{2}", "0.5")
            results["wrong"] = M.math_verify_match("\\frac{1}{3}", "0.5")
        except BaseException as error:                      # noqa: BLE001  (reported below)
            errors.append(error)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(60)
    assert not errors and results == {"frac": 1.0, "wrong": 0.0}

    # An alarm someone else armed (pytest-timeout arms one) must survive: math-verify would cancel it.
    armed = signal.getitimer(signal.ITIMER_REAL)
    ours = armed == (0.0, 0.0)
    if ours:
        signal.setitimer(signal.ITIMER_REAL, 300.0)
    try:
        assert M._alarm_timeout(5) is None
        assert M.math_verify_match("$(x+1)^2$", "x^2+2x+1") == 1.0
        assert signal.getitimer(signal.ITIMER_REAL)[0] > 0.0
    finally:
        if ours:
            signal.setitimer(signal.ITIMER_REAL, 0.0)
    if ours:
        assert M._alarm_timeout(5) == 5                      # main thread, no alarm: math-verify's own limit


def test_missing_math_verify_is_a_user_error_naming_the_pip_command(monkeypatch, tmp_path):
    from lmforge.eval.task_data import load_task
    from lmforge.eval.tasks import run_task

    monkeypatch.setitem(sys.modules, "math_verify", None)   # `import math_verify` now raises ImportError
    with pytest.raises(UserError, match=r"pip install math-verify==0\.9\.0"):
        M.math_verify_match("1/2", "0.5")
    lm = FixedAnswers({})
    with pytest.raises(UserError, match="math-verify"):
        run_task(load_task(_write_task(tmp_path)), lm)
    assert lm.calls == []                                   # refused before generating anything


# ------------------------------------------------------------------ through a user task YAML

RECORDS = [
    {"q": "Half of one?", "answer": "1/2"},
    {"q": "Expand (x+1)^2.", "answer": "x^2+2x+1"},
    {"q": "One third?", "answer": "\\frac{1}{3}"},
    {"q": "Seven plus ten?", "answer": "17"},
]


def _write_task(tmp_path, metric: str = "math_verify", extract: str = "none", records=RECORDS) -> str:
    (tmp_path / "math.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    path = tmp_path / "math.yaml"
    path.write_text(f"name: math\ndata: math.jsonl\ntype: generate\nprompt: \"Q: {{q}}\\nA:\"\ntarget: '{{answer}}'\n"
                    f"until: [\"\\n\"]\nmax_tokens: 16\nextract: {extract}\nmetric: {metric}\n")
    return str(path)


class FixedAnswers:
    """An EvalModel stand-in whose answers are fixed, so the task's scores are known by hand."""

    def __init__(self, answers: dict[str, list[str]]):
        self.answers = {prompt: list(texts) for prompt, texts in answers.items()}
        self.calls: list[dict] = []

    def generate(self, prompts, until, max_tokens=256, temperature=0.0, seed=None, chat=None):
        self.calls.append({"prompts": list(prompts), "until": list(until), "temperature": temperature})
        return [self.answers[p].pop(0) for p in prompts]


ANSWERS = {
    "Q: Half of one?\nA:": [" 0.5", " 1/3"],
    "Q: Expand (x+1)^2.\nA:": [" $(x+1)^2$", " x^2+1"],
    "Q: One third?\nA:": [" 0.333", " \\frac{2}{6}"],
    "Q: Seven plus ten?\nA:": [" 17", " 18"],
}


def test_yaml_task_scores_with_math_verify_and_reports_exact_match_beside_it(tmp_path):
    from lmforge.eval.task_data import load_task
    from lmforge.eval.tasks import run_task

    task = load_task(_write_task(tmp_path))
    assert task.metric == "math_verify" and task.kind == "generate"
    lm = FixedAnswers({p: a[:1] for p, a in ANSWERS.items()})
    result = run_task(task, lm)
    # 0.5 = 1/2 yes; (x+1)^2 = x^2+2x+1 yes; 0.333 != 1/3; 17 = 17 yes -> 3/4. Exactly equal: only 17.
    assert result.metric == "math_verify" and result.value == pytest.approx(0.75)
    assert result.metrics["exact_match"]["value"] == pytest.approx(0.25)
    assert lm.calls[0]["until"] == ["\n"] and lm.calls[0]["temperature"] == 0.0


def test_pass_at_k_counts_math_verify_answers(tmp_path):
    from lmforge.eval.task_data import load_task
    from lmforge.eval.tasks import run_task

    result = run_task(load_task(_write_task(tmp_path)), FixedAnswers(ANSWERS), samples=2)
    # Per question (first, second sample): (1, 0), (1, 0), (0, 1: 2/6 = 1/3), (1, 0).
    assert result.metrics["pass@2"]["value"] == pytest.approx(1.0)
    assert result.metrics["pass@1"]["value"] == pytest.approx(0.5)
    assert result.metrics["math_verify"]["value"] == pytest.approx(0.5)
    assert "exact_match" not in result.metrics                 # the name says what was counted


def test_yaml_task_on_the_tiny_model_equals_the_hand_computation(tmp_path):
    from infer_support import load_tiny
    from lmforge.eval.lm import EvalModel
    from lmforge.eval.task_data import load_task
    from lmforge.eval.tasks import run_task

    model, tokenizer = load_tiny()
    lm = EvalModel(model, tokenizer, ref="tiny")
    task = load_task(_write_task(tmp_path, extract="last_number"))
    result = run_task(task, lm)
    texts = lm.generate(task.prompts(task.docs, 0, 1234), until=["\n"], max_tokens=16)
    want = [M.math_verify_match(M.extract_last_number(t), d["reference"]) for t, d in zip(texts, task.docs)]
    assert result.metric == "math_verify" and result.n == 4
    assert result.value == pytest.approx(sum(want) / 4)


def test_bad_metric_or_extractor_in_yaml_is_a_user_error(tmp_path):
    from lmforge.eval.task_data import load_task

    with pytest.raises(UserError, match="extract 'math' is not one of gsm8k, last_number, none"):
        load_task(_write_task(tmp_path, extract="math"))
    with pytest.raises(UserError, match="use one of exact_match, math_verify"):
        load_task(_write_task(tmp_path, metric="symbolic"))
