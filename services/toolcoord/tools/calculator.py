"""`calculator`: arithmetic on a parsed syntax tree, never eval/exec.

Only numbers, + - * / // % **, unary signs, parentheses, a whitelist of math functions and constants are
walked; any other node (names, attributes, subscripts, lambdas, comprehensions, strings, keyword arguments, shifts)
is refused. Every operation that could build a huge integer is bounded before it runs, because CPython computes big
integers holding the GIL: a long one freezes the server's event loop, not just the tool's worker thread.
  - every integer, literals included, has at most MAX_INT_BITS bits, so each + - * / // % on them is microseconds;
  - `**` checks exponent·log2|base| before computing; `factorial` caps its argument;
  - `round(x, n)` caps |n| (an int rounded to -n digits computes 10**n: `round(1, -10**8)` took minutes);
  - floats cannot grow: overflow is an error, and math functions turn oversized ints into OverflowError.
So `9**9**9`, `factorial(10**6)` or `round(1, -10**8)` is an error in microseconds rather than a hung server.
"""

from __future__ import annotations

import ast
import math
import operator
from typing import Any, Callable

from specrelay.services.toolcoord.tools.base import ToolError

MAX_EXPRESSION_CHARS = 2000
MAX_INT_BITS = 4096  # about 1,233 decimal digits
MAX_EXPONENT = 10_000
MAX_FACTORIAL = 1000
MAX_ROUND_DIGITS = 1300  # past every MAX_INT_BITS integer (1,234 digits) and every float (1e308, 17 digits more)

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"expression": {"type": "string", "description": "an arithmetic expression, e.g. 2*(3+4)**0.5"}},
    "required": ["expression"],
}
DESCRIPTION = ("Evaluate an arithmetic expression: + - * / // % **, parentheses, and sqrt, exp, log, log2, log10, "
               "sin, cos, tan, asin, acos, atan, atan2, hypot, floor, ceil, abs, round, min, max, factorial, gcd; "
               "constants pi, e, tau, inf.")

Number = int | float


def _factorial(n: Number) -> int:
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ToolError("factorial takes a non-negative integer")
    if n > MAX_FACTORIAL:
        raise ToolError(f"factorial argument above {MAX_FACTORIAL}")
    return math.factorial(n)


def _round(x: Number, ndigits: Number | None = None) -> Number:
    if ndigits is None:
        return round(x)
    if not isinstance(ndigits, int):
        raise ToolError("round: the number of digits must be an integer")
    if abs(ndigits) > MAX_ROUND_DIGITS:
        raise ToolError(f"round: the number of digits must be between -{MAX_ROUND_DIGITS} and {MAX_ROUND_DIGITS}")
    return round(x, ndigits)


FUNCTIONS: dict[str, Callable[..., Number]] = {
    "sqrt": math.sqrt, "exp": math.exp, "log": math.log, "log2": math.log2, "log10": math.log10,
    "sin": math.sin, "cos": math.cos, "tan": math.tan, "asin": math.asin, "acos": math.acos, "atan": math.atan,
    "atan2": math.atan2, "hypot": math.hypot, "floor": math.floor, "ceil": math.ceil, "abs": abs, "round": _round,
    "min": min, "max": max, "factorial": _factorial, "gcd": math.gcd,
}
CONSTANTS: dict[str, float] = {"pi": math.pi, "e": math.e, "tau": math.tau, "inf": math.inf}


def _checked_pow(base: Number, exponent: Number) -> Number:
    if isinstance(base, int) and isinstance(exponent, int):
        if exponent > MAX_EXPONENT:
            raise ToolError(f"exponent above {MAX_EXPONENT}")
        # |base|^exp needs about exp·log2|base| bits: refuse before computing it.
        if abs(base) > 1 and exponent * math.log2(abs(base)) > MAX_INT_BITS:
            raise ToolError(f"result above {MAX_INT_BITS} bits")
    return operator.pow(base, exponent)


BINARY: dict[type, Callable[[Number, Number], Number]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: _checked_pow,
}
UNARY: dict[type, Callable[[Number], Number]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def _check_size(value: Number) -> Number:
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise ToolError(f"result above {MAX_INT_BITS} bits")
    if isinstance(value, complex):
        raise ToolError("complex results are not supported")
    return value


def _evaluate(node: ast.AST) -> Number:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
            raise ToolError(f"only numbers are allowed, not {node.value!r}")
        return _check_size(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in BINARY:
        return _check_size(BINARY[type(node.op)](_evaluate(node.left), _evaluate(node.right)))
    if isinstance(node, ast.UnaryOp) and type(node.op) in UNARY:
        return UNARY[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.Name):
        if node.id in CONSTANTS:
            return CONSTANTS[node.id]
        raise ToolError(f"unknown name {node.id!r}")
    if isinstance(node, ast.Call):
        if not isinstance(node.func, ast.Name) or node.func.id not in FUNCTIONS:
            raise ToolError(f"only these functions may be called: {', '.join(sorted(FUNCTIONS))}")
        if node.keywords:
            raise ToolError("keyword arguments are not allowed")
        return _check_size(FUNCTIONS[node.func.id](*[_evaluate(arg) for arg in node.args]))
    raise ToolError(f"{type(node).__name__} is not allowed in an expression")


def evaluate(expression: str) -> Number:
    """The value of an arithmetic expression, or ToolError saying what is not allowed."""
    if not isinstance(expression, str):
        raise ToolError("expression must be a string")
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ToolError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as e:
        raise ToolError(f"not an expression: {e.msg}") from None
    except (RecursionError, MemoryError):
        raise ToolError("expression nested too deeply") from None
    try:
        return _evaluate(tree)
    except ZeroDivisionError:
        raise ToolError("division by zero") from None
    except OverflowError:
        raise ToolError("numeric overflow") from None
    except RecursionError:
        raise ToolError("expression nested too deeply") from None
    except (TypeError, ValueError) as e:
        raise ToolError(f"invalid arithmetic: {e}") from None


def calculator(expression: str) -> str:
    """Tool entry: the result as text (integers exact, floats with repr precision)."""
    value = evaluate(expression)
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    return str(value)
