"""Request grammars (shared/grammar.py) and their token masks (shared/grammar_mask.py) on the small pair's
tokenizer: what the grammar lets through is what the tool parser reads as calls, and the mask at every node of a
hand-built draft tree is the mask plain decoding would compute after that node's path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

from specrelay.services.toolcoord.parser import parse_tool_calls
from specrelay.shared.grammar import GrammarError, json_grammar, tool_call_grammar
from specrelay.shared.grammar_mask import GrammarCompiler, constrained
from specrelay.shared.tool_prompt import tool_call_text

MODEL_DIR = Path(__file__).resolve().parents[2] / "models" / "target"
STOP = (2,)
WEATHER = {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
           "required": ["city", "days"]}
TOOLS = {"get_weather": WEATHER, "now": None}
MARKER_IDS = {"<tool_call>": 3, "</tool_call>": 4}  # added tokens of the pair's vocabulary


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_file(str(MODEL_DIR / "tokenizer.json"))


@pytest.fixture(scope="module")
def compiler():
    return GrammarCompiler.from_dir(str(MODEL_DIR), 4096)


def accepts(compiler, grammar: str, tok, text: str) -> bool:
    """Whether `text` followed by a stop token is a complete output of `grammar`."""
    c = compiler.start(grammar, STOP)
    for token in tok.encode(text, add_special_tokens=False).ids:
        if not c.allowed()[token]:
            return False
        c.commit([token])
    return bool(c.allowed()[STOP[0]])


def test_json_schema_grammar_accepts_valid_json_and_refuses_the_rest(compiler, tok):
    g = json_grammar(WEATHER)
    assert accepts(compiler, g, tok, '{"city": "Paris", "days": 3}')
    assert not accepts(compiler, g, tok, '{"city": "Paris"}')  # days is required
    assert not accepts(compiler, g, tok, '{"city": "Paris", "days": "3"}')
    assert not accepts(compiler, g, tok, 'Sure! {"city": "Paris", "days": 3}')
    assert accepts(compiler, json_grammar(None), tok, '{"anything": [1, 2]}')
    assert not accepts(compiler, json_grammar(None), tok, "[1, 2]")  # json_object: an object


def test_a_schema_llguidance_cannot_compile_is_a_grammar_error():
    with pytest.raises(GrammarError, match="nope"):
        json_grammar({"type": "nope"})


@pytest.mark.parametrize("parallel", [True, False])
def test_a_named_call_continues_the_forced_opening_into_what_the_parser_reads(compiler, tok, parallel):
    forced = '<tool_call>\n{"name": "get_weather", "arguments": '
    call = tool_call_text({"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}})
    g = tool_call_grammar("hermes", TOOLS, "get_weather", parallel, MARKER_IDS)
    rest = call.removeprefix(forced)
    assert accepts(compiler, g, tok, rest)
    assert not accepts(compiler, g, tok, '{"city": "Oslo"}}\n</tool_call>')  # arguments off the schema
    two = rest + "\n" + tool_call_text({"name": "get_weather", "arguments": {"city": "Rome", "days": 1}})
    assert accepts(compiler, g, tok, two) is parallel  # parallel_tool_calls false: at most one call
    other = rest + "\n" + tool_call_text({"name": "now", "arguments": {}})
    assert not accepts(compiler, g, tok, other)  # a named choice calls that function only
    calls = parse_tool_calls(forced + rest, "hermes", set(TOOLS)).tool_calls
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Oslo", "days": 2})]


def test_required_picks_any_tool_with_valid_arguments(compiler, tok):
    forced = '<tool_call>\n{"name": "'
    g = tool_call_grammar("hermes", TOOLS, None, token_ids=MARKER_IDS)
    for call in ({"name": "now", "arguments": {}}, {"name": "get_weather", "arguments": {"city": "A", "days": 1}}):
        assert accepts(compiler, g, tok, tool_call_text(call).removeprefix(forced))
    assert not accepts(compiler, g, tok, 'nothing", "arguments": {}}\n</tool_call>')  # not a tool
    assert not accepts(compiler, g, tok, 'get_weather", "arguments": 3}\n</tool_call>')  # not an object


def test_arguments_are_an_object_even_when_the_schema_does_not_say_so(compiler, tok):
    g = tool_call_grammar("hermes", {"f": {}}, "f", token_ids=MARKER_IDS)
    assert accepts(compiler, g, tok, '{"x": 1}}\n</tool_call>')
    assert not accepts(compiler, g, tok, '3}\n</tool_call>')


def test_llama3_calls_use_parameters_and_close_the_object(compiler, tok):
    g = tool_call_grammar("llama3", TOOLS, "get_weather")
    assert accepts(compiler, g, tok, '{"city": "A", "days": 1}}')
    assert accepts(compiler, g, tok, '{"city": "A", "days": 1}}; {"name": "get_weather", "parameters": '
                                     '{"city": "B", "days": 2}}')


def _fresh_rows(compiler, grammar, committed, tokens, parents, nodes):
    """The ground truth: for each of `nodes`, a new matcher fed the committed tokens and the node's path."""
    rows = {}
    for node in nodes:
        path, n = [], node
        while n > 0:
            path.append(tokens[n])
            n = parents[n]
        c = compiler.start(grammar, STOP)
        c.commit(committed + path[::-1])
        rows[node] = c.allowed()
    return rows


def test_the_mask_at_every_tree_node_is_plain_decoding_after_its_path(compiler, tok):
    g = json_grammar(WEATHER)
    ids = lambda s: tok.encode(s, add_special_tokens=False).ids  # noqa: E731
    committed = ids('{"city": "Pa')
    a, b = ids('ris", "days": ')[:2], ids('"')[0]
    # root (last committed token) -> a0 -> a1 -> "3"; root -> the closing quote -> a forbidden "{"
    digit, brace = ids("3")[0], ids("{")[0]
    tokens = [committed[-1], a[0], b, a[1], brace, digit]
    parents = [-1, 0, 0, 1, 2, 3]
    c = compiler.start(g, STOP)
    c.commit(committed)
    before = c.allowed()
    rows = c.tree_allowed(tokens, parents)
    truth = _fresh_rows(compiler, g, committed, tokens, parents, (0, 1, 2, 3, 5))
    assert not truth[2][brace]  # node 4 is off the grammar: its row is never used
    for node in truth:
        assert torch.equal(rows[node], truth[node]), node
    assert rows[4].all()
    assert torch.equal(c.allowed(), before)  # the walk rolled every node back


def test_stop_tokens_are_allowed_exactly_when_the_output_is_complete(compiler, tok):
    c = compiler.start(json_grammar(None), STOP)
    assert not c.allowed()[STOP[0]]
    c.commit(tok.encode("{}", add_special_tokens=False).ids)
    allowed = c.allowed()
    assert allowed[STOP[0]] and allowed.sum() == 1  # a closed object: only the end of the turn
    logits = constrained(torch.zeros(1, 4096), allowed)
    assert torch.isinf(logits).sum() == 4095 and logits[0, STOP[0]] == 0
