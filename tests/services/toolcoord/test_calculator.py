"""The calculator: arithmetic right, everything else refused with a reason, sizes bounded before computing."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from specrelay.services.toolcoord.tools.base import ToolError
from specrelay.services.toolcoord.tools.calculator import calculator


@pytest.mark.parametrize("expression, expected", [
    ("2 * (3 + 4)", "14"),
    ("7 // 2 + 7 % 2", "4"),
    ("-2 ** 2", "-4"),
    ("2 ** 0.5", "1.4142135623730951"),
    ("sqrt(16) + log10(1000)", "7"),
    ("max(1, 5, 3) - min(4, 2)", "3"),
    ("round(pi, 3)", "3.142"),
    ("factorial(20)", "2432902008176640000"),
    ("2 ** 100", "1267650600228229401496703205376"),
    ("1 / 3", "0.3333333333333333"),
    ("1e3 * 2", "2000"),
])
def test_arithmetic(expression, expected):
    assert calculator(expression) == expected


@pytest.mark.parametrize("expression, message", [
    ("__import__('os').system('echo pwned')", "only these functions may be called"),
    ("().__class__.__bases__[0].__subclasses__()", "only these functions may be called"),
    ("(1).__class__", "Attribute is not allowed"),
    ("pi[0]", "Subscript is not allowed"),
    ("open('/etc/passwd').read()", "only these functions may be called"),
    ("os.getcwd()", "only these functions may be called"),
    ("x", "unknown name 'x'"),
    ("[1, 2, 3]", "List is not allowed"),
    ("'a' * 10", "only numbers are allowed"),
    ("(lambda: 1)()", "only these functions may be called"),
    ("1; import os", "not an expression"),
    ("sqrt(x=4)", "keyword arguments"),
    ("True + 1", "only numbers are allowed"),
    ("1 if 1 else 2", "IfExp is not allowed"),
    ("1 << 5", "BinOp is not allowed"),
    ("1 / 0", "division by zero"),
    ("sqrt(-1)", "invalid arithmetic"),
    ("(-8) ** 0.5", "complex results"),
    ("10.0 ** 400", "numeric overflow"),
])
def test_refuses_code_and_bad_arithmetic(expression, message):
    with pytest.raises(ToolError, match=message):
        calculator(expression)


@pytest.mark.parametrize("expression", [
    "9 ** 9 ** 9", "2 ** 100000", "factorial(10 ** 6)", "(2 ** 4000) * (2 ** 4000) * (2 ** 4000)", "10 ** 2000",
    "(" * 5000 + "1" + ")" * 5000,
])
def test_huge_results_are_refused_quickly(expression):
    started = time.monotonic()
    with pytest.raises(ToolError):
        calculator(expression)
    assert time.monotonic() - started < 0.5


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="0123456789.+-*/%() eπ!^,sqrtfacloigmnxp_[]'\"", max_size=60))
def test_any_input_gives_a_number_or_a_tool_error_quickly(expression):
    started = time.monotonic()
    try:
        calculator(expression)
    except ToolError:
        pass
    assert time.monotonic() - started < 0.5


HOSTILE = [
    ("round(1, -10**8)", "round: the number of digits must be between -1300 and 1300"),
    ("round(10**1000, -10**9)", "round: the number of digits must be between -1300 and 1300"),
    ("round(7, -(2**4000))", "round: the number of digits must be between -1300 and 1300"),
    ("round(1.5, 10**100)", "round: the number of digits must be between -1300 and 1300"),
    ("round(1, 0.5)", "round: the number of digits must be an integer"),
    ("9" * 1500, "result above 4096 bits"),  # a literal is an integer like any other
    ("2 ** 10 ** 8", "exponent above 10000"),
    ("3 ** 9000", "result above 4096 bits"),
    ("factorial(10 ** 5)", "factorial argument above 1000"),
    ("10.0 ** 10 ** 6", "numeric overflow"),
    ("exp(10 ** 1000)", "numeric overflow"),
    ("1 << 10 ** 9", "BinOp is not allowed"),
    ("'a' * 10 ** 9", "only numbers are allowed"),
    ("b'a' * 10 ** 9", "only numbers are allowed"),
    ("max(9 ** 9 ** 9, 1)", "exponent above 10000"),
]

# Big-integer work holds the GIL, so a hung expression would freeze this process (and a server's event loop) too:
# the expressions run in a child, whose timeout is only a hang detector; what is asserted is each answer.
_EVALUATE_ALL = """
import asyncio, json, sys
from specrelay.services.toolcoord.tools.base import ToolError
from specrelay.services.toolcoord.tools.calculator import calculator
from specrelay.services.toolcoord.tools.registry import builtin_registry
answers = {}
for expression in json.loads(sys.stdin.read()):
    try:
        answers[expression] = ["value", calculator(expression)]
    except ToolError as e:
        answers[expression] = ["error", str(e)]
tool = asyncio.run(builtin_registry({"python": False}).call("calculator", {"expression": "round(1, -10**8)"}))
answers["tool"] = [tool.is_error, tool.content]
print(json.dumps(answers))
"""


@pytest.fixture(scope="module")
def hostile_answers():
    child = subprocess.run([sys.executable, "-c", _EVALUATE_ALL], input=json.dumps([e for e, _ in HOSTILE]),
                           capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, child.stderr
    return json.loads(child.stdout)


@pytest.mark.parametrize("expression, message", HOSTILE)
def test_hostile_expressions_are_refused_without_computing_them(hostile_answers, expression, message):
    kind, text = hostile_answers[expression]
    assert kind == "error" and text.startswith(message), (kind, text[:200])


def test_the_tool_answer_for_a_hostile_round_is_an_error_the_model_can_read(hostile_answers):
    assert hostile_answers["tool"] == [True, "error: round: the number of digits must be between -1300 and 1300"]
    assert calculator("round(123456, -3)") == "123000" and calculator("round(2.675, 2)") == "2.67"
