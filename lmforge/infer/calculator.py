"""A safe arithmetic evaluator: the calculator tool. It never calls `eval`.

    calculate("2 + 3 * (4 - 1)")   -> "11"
    calculate("10 / 4")            -> "2.5"
    calculate("__import__('os')")  -> CalculatorError: function calls are not allowed

The expression is parsed with `ast.parse(mode="eval")` and the tree is walked by hand. Only number
literals, the binary operators + - * / // % **, unary + and -, and parentheses (which the parser
already folded into the tree) are accepted; any other node (a name, an attribute, a call, a
subscript, a comparison, a string, a lambda...) is refused by name. Sizes are bounded before work is
done, so no input can take the process's time or memory: the text's length, the number of nodes,
the exponent, and the magnitude of every intermediate result.
"""
from __future__ import annotations

import ast
import math
import operator
import re
from typing import Callable

MAX_CHARS = 200              # a longer "expression" is not arithmetic a model should write
MAX_NODES = 100              # operators + numbers
MAX_EXPONENT = 1000          # |b| in a ** b
MAX_DIGITS = 100             # decimal digits of any intermediate integer
MAX_MAGNITUDE = 1e100        # |x| of any intermediate float
# What people and models write for the operators, turned into Python's spelling first.
_SPELLINGS = {"×": "*", "÷": "/", "−": "-", "^": "**", "·": "*"}

_BINARY: dict[type, Callable] = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
                                  ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv,
                                  ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY: dict[type, Callable] = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_REFUSED = {ast.Name: "names (variables) are not allowed", ast.Attribute: "attribute access is not allowed",
            ast.Call: "function calls are not allowed", ast.Subscript: "indexing is not allowed",
            ast.Compare: "comparisons are not allowed", ast.BoolOp: "and/or are not allowed",
            ast.Lambda: "lambdas are not allowed", ast.IfExp: "conditional expressions are not allowed"}


class CalculatorError(ValueError):
    """The expression is not plain arithmetic, or is too big to compute; the message says which."""


def calculate(expression: str) -> str:
    """The value of an arithmetic expression, as text (integers exactly, other values to 6 decimals)."""
    return format_number(evaluate(expression))


def evaluate(expression: str) -> int | float:
    """The value of an arithmetic expression (see the module docstring for what is accepted)."""
    if not isinstance(expression, str):
        raise CalculatorError(f"the expression must be text, not {type(expression).__name__}")
    text = expression.strip().rstrip("=").strip()
    for spelling, python in _SPELLINGS.items():
        text = text.replace(spelling, python)
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)   # 1,234 -> 1234 (thousands separators)
    if not text:
        raise CalculatorError("the expression is empty; write arithmetic such as 2 + 3")
    if len(text) > MAX_CHARS:
        raise CalculatorError(f"the expression is {len(text)} characters long; the limit is {MAX_CHARS}")
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError):
        raise CalculatorError(f"'{text}' is not an arithmetic expression") from None
    nodes = sum(1 for _ in ast.walk(tree))
    if nodes > MAX_NODES:
        raise CalculatorError(f"the expression has {nodes} parts; the limit is {MAX_NODES}")
    return _value(tree.body)


def format_number(value: int | float) -> str:
    if isinstance(value, float):
        if not math.isfinite(value):
            raise CalculatorError("the result is not a finite number")
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        return repr(round(value, 6))
    return str(value)


def _value(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant):
        # bool is an int subclass and complex is a number: neither is arithmetic input here.
        if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
            raise CalculatorError(f"{node.value!r} is not a number")
        return _checked(node.value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _checked(_UNARY[type(node.op)](_value(node.operand)))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _value(node.left), _value(node.right)
        if isinstance(node.op, ast.Pow):
            _check_power(left, right)
        try:
            result = _BINARY[type(node.op)](left, right)
        except ZeroDivisionError:
            raise CalculatorError("division by zero") from None
        except OverflowError:
            raise CalculatorError("the result is too large") from None
        if isinstance(result, complex):   # (-8) ** 0.5
            raise CalculatorError("the result is not a real number")
        return _checked(result)
    for kind, reason in _REFUSED.items():
        if isinstance(node, kind):
            raise CalculatorError(f"{reason}; the calculator takes numbers and + - * / // % ** only")
    raise CalculatorError(f"{type(node).__name__} is not arithmetic; the calculator takes numbers and "
                          "+ - * / // % ** only")


def _check_power(base: int | float, exponent: int | float) -> None:
    """Refuse a ** b whose result would exceed the size limits, before computing it."""
    if abs(exponent) > MAX_EXPONENT:
        raise CalculatorError(f"the exponent {exponent} is too large; the limit is {MAX_EXPONENT}")
    if abs(base) > 1 and exponent > 0 and exponent * math.log10(abs(base)) > MAX_DIGITS:
        raise CalculatorError(f"{base} ** {exponent} has more than {MAX_DIGITS} digits")


def _checked(value: int | float) -> int | float:
    if isinstance(value, int):
        if value.bit_length() > MAX_DIGITS * 3.33:   # 10**100 ~ 2**333
            raise CalculatorError(f"an intermediate result has more than {MAX_DIGITS} digits")
    elif not math.isfinite(value) or abs(value) > MAX_MAGNITUDE:
        raise CalculatorError("an intermediate result is too large")
    return value
