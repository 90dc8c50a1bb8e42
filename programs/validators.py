"""Checks that run between LM steps: a safe calculator, label membership, number parsing.

Plain functions with no DSPy in them, so each can be tested alone and reused by the metrics.
A failed check raises a `ValueError` subclass whose message is written to be fed back to the model.
"""

from __future__ import annotations

import ast
import difflib
import json
import math
import operator
import re
from typing import Callable, Iterable, Sequence

Number = int | float

MAX_EXPRESSION_CHARS = 300  # a step of a word problem is short; this also bounds parser recursion
MAX_MAGNITUDE = 10**15  # every intermediate value stays below this, so no operation can blow up memory or time
MAX_EXPONENT = 64
RESULT_DECIMALS = 9  # hides binary float noise (0.1 + 0.2) without touching real answers


class CalculatorError(ValueError):
    """An expression is not plain arithmetic, or its value cannot be computed."""


class LabelError(ValueError):
    """A value is not one of the allowed labels; `closest` holds the nearest ones."""

    def __init__(self, value: str, closest: list[str], reason: str = ""):
        self.value, self.closest = value, closest
        hint = f"closest labels: {', '.join(closest)}" if closest else "no label is close"
        super().__init__(reason or f"{value!r} is not an allowed label; {hint}")


# ---------------------------------------------------------------- calculator

_BINARY: dict[type, Callable[[Number, Number], Number]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY: dict[type, Callable[[Number], Number]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_FUNCTIONS: dict[str, Callable[..., Number]] = {
    "round": round,
    "abs": abs,
    "min": min,
    "max": max,
    "floor": math.floor,
    "ceil": math.ceil,
    "sqrt": math.sqrt,
}
_SYMBOL = {ast.BitXor: "^", ast.BitAnd: "&", ast.BitOr: "|", ast.LShift: "<<", ast.RShift: ">>", ast.MatMult: "@"}

_THOUSANDS = re.compile(r"(?<![\d.])\d{1,3}(?:,\d{3})+(?![\d,])")
_PERCENT = re.compile(r"(\d+(?:\.\d+)?|\.\d+)\s*%(?!\s*[\d.(])")
_TIMES = re.compile(r"(?<=[\d)])\s*[xX]\s*(?=[\d(])")
_FUNCTION_CALL = re.compile(r"[A-Za-z_]\w*\s*\(")


def preprocess(expression: str) -> str:
    """Rewrite the notations models copy from word problems into Python arithmetic.

    In this order: an `=` and what follows is dropped (models often echo the result: `16-3-4=9`);
    `$` signs are removed; `×`, and `x` between two numbers, become `*`; `÷` becomes `/`; `^` becomes `**`;
    a percentage `15%` becomes `(15/100)` when the `%` is not followed by a number or `(`
    (`10 % 3` stays modulo); commas in `1,000`-style numbers are removed, but only when the expression
    calls no function, because inside `max(100,200)` the comma separates arguments.
    """
    text = expression.split("=", 1)[0].strip()
    text = text.replace("$", "").replace("×", "*").replace("÷", "/").replace("^", "**")
    text = _TIMES.sub("*", text)
    if not _FUNCTION_CALL.search(text):
        text = _THOUSANDS.sub(lambda m: m.group(0).replace(",", ""), text)
    return _PERCENT.sub(r"(\1/100)", text)


def calculate(expression: str) -> Number:
    """Value of an arithmetic expression, computed over a whitelisted syntax tree (never `eval`).

    Allowed: int and decimal numbers, `+ - * / // % **`, unary `+ -`, parentheses and the functions
    round, abs, min, max, floor, ceil, sqrt. The result is an int when it is a whole number.
    """
    if not expression or not expression.strip():
        raise CalculatorError("the expression is empty")
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise CalculatorError(f"the expression is longer than {MAX_EXPRESSION_CHARS} characters; split it into steps")
    text = preprocess(expression)
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        raise CalculatorError(f"{expression!r} is not a valid arithmetic expression ({type(e).__name__})") from None
    try:
        value = _evaluate(tree.body)
    except CalculatorError:
        raise
    except ZeroDivisionError:
        raise CalculatorError(f"division by zero in {expression!r}") from None
    except (ArithmeticError, ValueError, TypeError) as e:
        raise CalculatorError(f"cannot compute {expression!r}: {e}") from None
    return _tidy(_bounded(value))


def _evaluate(node: ast.AST) -> Number:
    if isinstance(node, ast.Constant):
        if type(node.value) not in (int, float):
            raise CalculatorError(f"only numbers are allowed, not {node.value!r}")
        return _bounded(node.value)
    if isinstance(node, ast.BinOp):
        op = _BINARY.get(type(node.op))
        if op is None:
            symbol = _SYMBOL.get(type(node.op), type(node.op).__name__)
            raise CalculatorError(f"operator {symbol} is not allowed; use + - * / // % **")
        left, right = _evaluate(node.left), _evaluate(node.right)
        if op is operator.pow:
            _check_power(left, right)
        return _bounded(op(left, right))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.Call):
        name = node.func.id if isinstance(node.func, ast.Name) else None
        if name not in _FUNCTIONS:
            raise CalculatorError(f"only the functions {', '.join(_FUNCTIONS)} may be called")
        if node.keywords or any(isinstance(a, ast.Starred) for a in node.args):
            raise CalculatorError(f"{name}() takes plain positional numbers only")
        return _bounded(_FUNCTIONS[name](*(_evaluate(a) for a in node.args)))
    if isinstance(node, ast.Name):
        raise CalculatorError(f"unknown name {node.id!r}; write the number itself")
    raise CalculatorError(f"{type(node).__name__} is not allowed in an arithmetic expression")


def _check_power(base: Number, exponent: Number) -> None:
    if abs(exponent) > MAX_EXPONENT:
        raise CalculatorError(f"exponent {exponent} is too large (limit {MAX_EXPONENT})")
    if abs(base) > 1 and exponent > 0 and exponent * math.log10(abs(base)) > math.log10(MAX_MAGNITUDE):
        raise CalculatorError(f"{base} ** {exponent} is too large (limit {MAX_MAGNITUDE:.0e})")


def _bounded(value: Number) -> Number:
    if isinstance(value, complex):
        raise CalculatorError("the result is not a real number")
    if isinstance(value, float) and not math.isfinite(value):
        raise CalculatorError("the result is not a finite number")
    if abs(value) > MAX_MAGNITUDE:
        raise CalculatorError(f"a value exceeds the limit of {MAX_MAGNITUDE:.0e}")
    return value


def _tidy(value: Number) -> Number:
    if isinstance(value, float):
        value = round(value, RESULT_DECIMALS)
        if value.is_integer():
            return int(value)
    return value


def format_number(value: Number) -> str:
    """`5` for whole numbers (never `5.0`), the shortest round-trip form otherwise."""
    return str(_tidy(value))


_REFERENCE = re.compile(r"#(\d+)")


def evaluate_steps(expressions: Sequence[str]) -> list[Number]:
    """Compute expressions in order; `#n` in an expression stands for the result of step n (1-based)."""
    if not expressions:
        raise CalculatorError("there are no steps; give at least one step with an expression")
    results: list[Number] = []

    def resolve(match: re.Match[str]) -> str:
        index = int(match.group(1))
        if not 1 <= index <= len(results):
            raise CalculatorError(f"step {len(results) + 1} refers to #{index}, but only #1..#{len(results)} exist")
        return f"({results[index - 1]!r})"

    for number, expression in enumerate(expressions, start=1):
        try:
            results.append(calculate(_REFERENCE.sub(resolve, expression)))
        except CalculatorError as e:
            raise CalculatorError(f"step {number}: {e}") from None
    return results


# ---------------------------------------------------------------- labels

_QUOTES = "'\"`“”‘’"


def normalize_label(value: str) -> str:
    """Case-folded, quotes and end punctuation dropped, spaces and hyphens as `_`.

    `"Card Arrival."` → `card_arrival`; `reverted_card_payment?` → `reverted_card_payment`.
    """
    text = value.strip().strip(_QUOTES).strip().rstrip(".?!").strip()
    return re.sub(r"[\s\-]+", "_", text).casefold()


def check_label(value: str, labels: Iterable[str]) -> str:
    """The canonical label that `value` names after normalisation; `LabelError` with the closest labels if none."""
    by_key = {normalize_label(label): label for label in labels}
    key = normalize_label(str(value))
    if key in by_key:
        return by_key[key]
    closest = difflib.get_close_matches(key, list(by_key), n=3, cutoff=0.5)
    raise LabelError(str(value), [by_key[k] for k in closest])


def check_labels(values: object, labels: Iterable[str]) -> list[str]:
    """The canonical labels a multi-label answer names, distinct, in its order: `values` is a list, or text
    holding a JSON or Python list (an answer read back unparsed: `"['a', 'b']"`), or one label.
    `LabelError` for the first value that names no label, or when no label is given at all."""
    labels = list(labels)
    if isinstance(values, str) and values.lstrip().startswith("["):
        values = _list_text(values)
    items = values if isinstance(values, (list, tuple)) else [values]
    if not items:
        raise LabelError("[]", [], "no label was given; give at least one")
    return list(dict.fromkeys(check_label(str(value), labels) for value in items))


def _list_text(text: str) -> object:
    for read in (json.loads, ast.literal_eval):
        try:
            return read(text)
        except (ValueError, SyntaxError):
            continue
    return text


# ---------------------------------------------------------------- numbers in text

_NUMBER = re.compile(r"(?<![\d.,])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|(?<![\d.])-?\.\d+")


def parse_number(text: object) -> Number:
    """The last number written in `text` (`"$1,200.50"` → 1200.5, `"72 apples"` → 72, `"#### 18"` → 18).

    The last one, because models state the answer after the working. A `%` is ignored (`"15%"` → 15).
    """
    if isinstance(text, bool):
        raise ValueError("a yes/no value is not a number")
    if isinstance(text, (int, float)):
        return _tidy(text) if math.isfinite(text) else _raise_no_number(text)
    found = _NUMBER.findall(str(text).split("####")[-1])
    if not found:
        _raise_no_number(text)
    return _tidy(float(found[-1].replace(",", "")))


def _raise_no_number(text: object) -> Number:
    raise ValueError(f"no number found in {str(text)[:80]!r}")
