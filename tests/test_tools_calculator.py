"""The calculator tool: arithmetic only, bounded, never eval."""
from __future__ import annotations

import pytest

from lmforge.infer.calculator import CalculatorError, calculate


@pytest.mark.parametrize("expression, value", [
    ("2 + 3 * (4 - 1)", "11"), ("10 / 4", "2.5"), ("-7 // 2", "-4"), ("7 % 3", "1"), ("2 ** 10", "1024"),
    ("1/3", "0.333333"), ("-(-(3))", "3"), ("+5", "5"), ("1,234 + 1", "1235"), ("12 × 4 =", "48"),
    ("6 ÷ 4", "1.5"), ("2^3", "8"), ("0.1 + 0.2", "0.3"), ("8717446 - 1663 * 5242", "0"),
])
def test_arithmetic_matches_python(expression, value):
    assert calculate(expression) == value


@pytest.mark.parametrize("expression, reason", [
    ("__import__('os').system('ls')", "function calls are not allowed"),
    ("x + 1", "names (variables) are not allowed"),
    ("(1).real", "attribute access is not allowed"),
    ("[1, 2][0]", "indexing is not allowed"),
    ("[1, 2]", "List is not arithmetic"),
    ("'a' * 3", "is not a number"),
    ("True + 1", "is not a number"),
    ("1 < 2", "comparisons are not allowed"),
    ("lambda: 1", "lambdas are not allowed"),
    ("1 if 1 else 2", "conditional expressions are not allowed"),
    ("2 ** 100000", "exponent 100000 is too large"),
    ("9 ** 9 ** 9", "is too large"),
    ("10 ** 999", "more than 100 digits"),
    ("99999999999 ** 99", "more than 100 digits"),
    ("1e300 * 1e300", "too large"),
    ("1 / 0", "division by zero"),
    ("5 % 0", "division by zero"),
    ("(-8) ** 0.5", "not a real number"),
    ("1 +", "not an arithmetic expression"),
    ("", "empty"),
    ("1+" * 150 + "1", "characters long"),
    ("-" * 150 + "1", "parts"),
])
def test_non_arithmetic_and_oversized_input_is_refused_by_name(expression, reason):
    with pytest.raises(CalculatorError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        calculate(expression)


def test_the_evaluator_never_calls_eval(monkeypatch):
    import builtins

    def no_eval(*args, **kwargs):
        raise AssertionError("eval was called")

    monkeypatch.setattr(builtins, "eval", no_eval)
    monkeypatch.setattr(builtins, "exec", no_eval)
    assert calculate("(2 + 3) * 4") == "20"
