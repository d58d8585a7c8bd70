"""The ``calculator`` tool: exact arithmetic by walking the syntax tree, nothing executed.

Not workflow code, though deterministic: pure computation with bounded exponents and digits,
so no expression can hold the worker's CPU.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable
from typing import Any

from keel.activities.catalog import CalculatorArgs
from keel.activities.tools.base import ToolContext, invalid_input, tool_failed

__all__ = ["calculator", "evaluate_expression"]

_BINARY: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY: dict[type[ast.unaryop], Callable[[Any], Any]] = {
    ast.UAdd: operator.pos,
    ast.USub: operator.neg,
}
_CONSTANTS = {"pi": math.pi, "e": math.e}
_MAX_EXPONENT = 1000
_MAX_DIGITS = 1000
"""Results with more decimal digits than this are refused as absurd."""


def _check_size(value: object) -> int | float:
    if isinstance(value, complex):
        raise tool_failed("the result is a complex number")
    if not isinstance(value, int | float):
        raise invalid_input(f"unsupported value {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise tool_failed("the result is too large")
    if isinstance(value, int) and value.bit_length() > _MAX_DIGITS * 3.33:
        raise tool_failed("the result is too large")
    return value


def _power(base: Any, exponent: Any) -> Any:
    # Checked before computing: 9**9**9 would otherwise hold the worker's CPU for minutes.
    if abs(exponent) > _MAX_EXPONENT:
        raise tool_failed(f"exponent {exponent} is too large (limit {_MAX_EXPONENT})")
    if exponent > 0 and abs(base) > 1 and exponent * math.log10(abs(base)) > _MAX_DIGITS:
        raise tool_failed("the result is too large")
    return base**exponent


def _round(value: Any, ndigits: Any = None) -> Any:
    # round(5, -10**100) never finishes, so the digit count is bounded like an exponent.
    if ndigits is None:
        return round(value)
    if not isinstance(ndigits, int) or abs(ndigits) > 100:
        raise invalid_input("round() takes a whole number of digits between -100 and 100")
    return round(value, ndigits)


_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "sqrt": math.sqrt,
    "log": math.log,
    "exp": math.exp,
    "sin": math.sin,
    "cos": math.cos,
    "abs": abs,
    "round": _round,
    "min": min,
    "max": max,
}


def _eval(node: ast.AST) -> int | float:
    if isinstance(node, ast.Expression):
        return _eval(node.body)
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, int | float):
            raise invalid_input(f"unsupported constant {node.value!r}")
        return _check_size(node.value)
    if isinstance(node, ast.Name):
        if node.id not in _CONSTANTS:
            raise invalid_input(f"unknown name {node.id!r}")
        return _CONSTANTS[node.id]
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _check_size(_UNARY[type(node.op)](_eval(node.operand)))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow):
            return _check_size(_power(left, right))
        return _check_size(_BINARY[type(node.op)](left, right))
    if isinstance(node, ast.Call):
        if not isinstance(node.func, ast.Name) or node.func.id not in _FUNCTIONS or node.keywords:
            raise invalid_input(f"unsupported call {ast.unparse(node.func)!r}")
        values = [_eval(arg) for arg in node.args]
        return _check_size(_FUNCTIONS[node.func.id](*values))
    raise invalid_input(f"unsupported syntax {type(node).__name__}")


def evaluate_expression(expression: str) -> int | float:
    """Evaluate arithmetic safely by walking the syntax tree; nothing else is executed.

    Args:
        expression: Numbers, + - * / // % **, parentheses, sqrt, log, exp, sin, cos, abs,
            round, min, max, pi and e.

    Returns:
        The value.

    Raises:
        ApplicationError: ``TOOL_INPUT_INVALID`` for anything but arithmetic, ``TOOL_FAILED``
            for division by zero, math domain errors and absurdly large results.
    """
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, ValueError, MemoryError, RecursionError) as e:
        raise invalid_input(f"not an arithmetic expression: {e}") from None
    try:
        return _eval(tree)
    except ZeroDivisionError:
        raise tool_failed("division by zero") from None
    except OverflowError:
        raise tool_failed("the result is too large") from None
    except ValueError as e:
        raise tool_failed(f"math error: {e}") from None
    except (TypeError, RecursionError) as e:
        raise invalid_input(f"bad expression: {e}") from None


async def calculator(args: CalculatorArgs, ctx: ToolContext) -> str:
    """The ``calculator`` tool: the expression's value as text."""
    return str(evaluate_expression(args.expression))
