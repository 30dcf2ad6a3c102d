"""Benchmark metrics, written out so each one can be checked by hand.

- multiple choice (lm-eval's definitions): `acc` picks the choice with the highest summed
  log-probability; `acc_norm` divides each choice's log-probability by its length in characters
  first, so a long answer is not penalised for having more tokens to pay for.
- exact match with answer extraction: GSM8K's "#### N" line (strict) or the last number in the
  text (flexible); numbers are compared after dropping commas, "$" and a trailing ".".
- math_verify (symbolic answers): HF's math-verify (`pip install math-verify==0.9.0`) parses the
  extracted answer and the reference into SymPy and compares them as mathematics, so "1/2",
  "0.5" and "\\frac{1}{2}" agree and "(x+1)^2" equals "x^2+2x+1"; numbers agree to 6 decimals.
- pass@k (Chen et al. 2021, the HumanEval paper): the unbiased estimator
  1 - C(n-c, k) / C(n, k) from n samples of which c pass.
- bits per byte: total nats / ln 2 / UTF-8 bytes (lmforge.eval.loss.bits_per_byte).
- stderr: the bootstrap standard deviation of the metric over resampled questions.
"""
from __future__ import annotations

import math
import re
import signal
import threading
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import UserError
from .loss import bits_per_byte  # noqa: F401  (re-exported: the one definition)

GSM8K_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")          # lm-eval's gsm8k "strict-match"
NUMBER = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")          # lm-eval's gsm8k "flexible-extract"


def choice_scores(logprobs: Sequence[float], choices: Sequence[str]) -> tuple[int, int]:
    """(argmax of log p, argmax of log p / len(choice chars)): the picks behind acc and acc_norm."""
    lengths = np.array([max(len(c), 1) for c in choices], dtype=np.float64)
    values = np.asarray(logprobs, dtype=np.float64)
    return int(np.argmax(values)), int(np.argmax(values / lengths))


def normalize_number(text: str) -> str:
    """'$1,234.' -> '1234'; '3.50' -> '3.5'; other text is stripped and returned as is."""
    text = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        value = float(text)
    except ValueError:
        return text
    return str(int(value)) if value.is_integer() else repr(value)


def extract_gsm8k(text: str) -> str | None:
    """The number after the first '#### ' (None when there is none)."""
    match = GSM8K_STRICT.search(text)
    return normalize_number(match.group(1)) if match else None


def extract_last_number(text: str) -> str | None:
    """The last number in the text (None when there is none)."""
    found = [a or b for a, b in NUMBER.findall(text)]
    found = [f for f in found if any(ch.isdigit() for ch in f)]
    return normalize_number(found[-1]) if found else None


EXTRACTORS: dict[str, Callable[[str], str | None]] = {
    "gsm8k": extract_gsm8k, "last_number": extract_last_number, "none": lambda text: text.strip(),
}


def exact_match(prediction: str | None, reference: str, numeric: bool = True) -> float:
    """1.0 when the extracted prediction equals the reference (as numbers when both are numbers)."""
    if prediction is None:
        return 0.0
    if numeric:
        return float(normalize_number(prediction) == normalize_number(reference))
    return float(prediction.strip() == reference.strip())


MATH_VERIFY = "math-verify==0.9.0"
_LATEX_DELIMITERS = ("$", "\\(", "\\[", "\\boxed")


def require_math_verify() -> Any:
    """The math_verify module, or a UserError naming the pip command when it is not installed."""
    try:
        import math_verify
    except ImportError as error:
        raise UserError(f"the metric 'math_verify' needs the math-verify package ({error}); install it with "
                        f"`pip install {MATH_VERIFY}` (it brings latex2sympy2_extended and antlr4-python3-runtime)"
                        ) from None
    return math_verify


def _alarm_timeout(seconds: int) -> int | None:
    """math-verify bounds each parse and comparison with signal.alarm, which works only on the main
    thread and would cancel, not nest inside, an alarm someone else armed (pytest-timeout, a
    watchdog). There we pass None: math-verify then runs without its time limit."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "getitimer"):
        return None
    return seconds if signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0) else None


def _as_latex(text: str) -> str:
    """A bare answer ('x^2+2x+1') wrapped in $...$, since math-verify reads variables only inside
    LaTeX delimiters; text that already has delimiters is returned as is."""
    return text if any(d in text for d in _LATEX_DELIMITERS) else f"${text}$"


def math_verify_match(prediction: str | None, reference: str, timeout_s: int = 5) -> float:
    """1.0 when math-verify finds the prediction's answer mathematically equal to the reference.

    The reference is a bare answer (read as LaTeX). The prediction is read the way math-verify reads
    a model's output (\\boxed{}, $...$, "the final answer is", else the last number or expression);
    when that reading does not match and the text has no LaTeX delimiters, it is read once more as a
    bare answer, which is what a one-line answer such as "2x+2" is (math-verify's plain reading of
    it is just "2"). Nothing parseable is 0.0, never an error.
    """
    if prediction is None or not prediction.strip() or not reference.strip():
        return 0.0
    mv = require_math_verify()
    timeout = _alarm_timeout(timeout_s)
    gold = mv.parse(_as_latex(reference), parsing_timeout=timeout)
    if not gold:
        return 0.0
    bare = _as_latex(prediction)
    for text in dict.fromkeys((prediction, bare)):          # the bare reading only when it differs
        answer = mv.parse(text, parsing_timeout=timeout)
        if answer and mv.verify(gold, answer, timeout_seconds=timeout):
            return 1.0
    return 0.0


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    # The product form avoids huge binomials: prod_{i=n-c+1}^{n} (1 - k / i).
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def bootstrap_stderr(values: Sequence[float], statistic: Callable[[np.ndarray], float] | None = None,
                     iterations: int = 1000, seed: int = 1234) -> float | None:
    """Standard deviation of `statistic` (the mean by default) over resamples with replacement of
    the per-question `values` [n] (or rows [n, k]); None with fewer than two questions."""
    data = np.asarray(values, dtype=np.float64)
    if len(data) < 2:
        return None
    rng = np.random.default_rng(seed)
    index = rng.integers(0, len(data), size=(iterations, len(data)))          # [iterations, n]
    if statistic is None:
        stats = data[index].mean(axis=1) if data.ndim == 1 else None
    else:
        stats = np.array([statistic(data[row]) for row in index])
    if stats is None:
        raise ValueError("a statistic is needed for 2-d values")
    return float(np.std(stats, ddof=1))


def bpb_statistic(rows: np.ndarray) -> float:
    """Bits per byte of rows [n, 2] = (nats, bytes) per document: a ratio of sums, not a mean."""
    return float(rows[:, 0].sum() / math.log(2) / rows[:, 1].sum())
