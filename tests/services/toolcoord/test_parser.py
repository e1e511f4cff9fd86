"""Tool-call parsing, streamed and not: what the client sees in content, tool_calls and errors."""

from __future__ import annotations

import itertools
import json
import re

from hypothesis import given, settings
from hypothesis import strategies as st

from specrelay.services.toolcoord.parser import StreamingToolParser, parse_tool_calls

CALC = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "2 * (3 + 4)"}}\n</tool_call>'
PY = '<tool_call>\n{"name": "python", "arguments": {"code": "print(\'}\')\\nx = {1: 2}"}}\n</tool_call>'


def ids():
    counter = itertools.count()
    return lambda: f"call_{next(counter):024d}"


def stream(text: str, cuts: list[int], **kwargs):
    """Feed `text` in pieces cut at `cuts`; return (content, {index: [deltas]}, errors, parser.result)."""
    parser = StreamingToolParser(id_factory=ids(), **kwargs)
    content, calls, errors = "", {}, []
    bounds = [0, *sorted(set(c for c in cuts if 0 < c < len(text))), len(text)]
    deltas = [parser.feed(text[a:b]) for a, b in zip(bounds, bounds[1:])] + [parser.finish()]
    for d in deltas:
        content += d.content
        for piece in d.tool_calls:
            calls.setdefault(piece.index, []).append(piece)
        errors += d.errors
    return content, calls, errors, parser.result


def test_hermes_calls_become_openai_tool_calls():
    out = parse_tool_calls(f"I will compute it.\n{CALC}\n{PY}")
    assert out.content == "I will compute it."
    assert out.finish_reason == "tool_calls" and out.errors == []
    message = out.to_openai_message()
    assert [c["function"]["name"] for c in message["tool_calls"]] == ["calculator", "python"]
    assert json.loads(message["tool_calls"][0]["function"]["arguments"]) == {"expression": "2 * (3 + 4)"}
    assert json.loads(message["tool_calls"][1]["function"]["arguments"]) == {"code": "print('}')\nx = {1: 2}"}
    assert all(re.fullmatch(r"call_[A-Za-z0-9]{24}", c["id"]) for c in message["tool_calls"])
    assert message["tool_calls"][0]["type"] == "function"


def test_plain_text_is_content_untouched():
    text = "a < b and <tool is not a call;\n\n  indented {braces}"
    out = parse_tool_calls(text)
    assert out.content == text and out.tool_calls == [] and out.finish_reason is None


def test_streaming_never_leaks_markup_and_arguments_arrive_in_pieces():
    text = f"Thinking.\n{CALC}\n{PY}"
    content, calls, errors, result = stream(text, list(range(len(text))))  # one character at a time
    assert content == "Thinking." and errors == []
    assert sorted(calls) == [0, 1]
    for index, pieces in calls.items():
        first = pieces[0]
        assert first.id == f"call_{index:024d}" and first.name == result.tool_calls[index].name
        assert all(p.id is None and p.name is None for p in pieces[1:])
        assert len(pieces) > 5  # the arguments were streamed, not sent at the end
        assert "".join(p.arguments for p in pieces) == result.tool_calls[index].arguments
    assert json.loads(result.tool_calls[1].arguments)["code"] == "print('}')\nx = {1: 2}"
    assert calls[0][0].to_openai() == {"index": 0, "id": "call_" + "0" * 24, "type": "function",
                                       "function": {"name": "calculator", "arguments": ""}}
    assert calls[0][1].to_openai() == {"index": 0, "function": {"arguments": calls[0][1].arguments}}


def test_malformed_calls_become_errors_and_good_calls_survive():
    bad_json = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "1+"\n</tool_call>'
    no_name = '<tool_call>\n{"arguments": {}}\n</tool_call>'
    list_args = '<tool_call>\n{"name": "calculator", "arguments": [1, 2]}\n</tool_call>'
    unknown = '<tool_call>\n{"name": "rm_rf", "arguments": {}}\n</tool_call>'
    out = parse_tool_calls("\n".join([bad_json, CALC, no_name, list_args, unknown]),
                           tool_names={"calculator", "python"})
    assert [c.name for c in out.tool_calls] == ["calculator"]
    messages = [e.message for e in out.errors]
    assert messages[0].startswith("tool call is not valid JSON")
    assert messages[1] == 'a tool call needs a non-empty string "name"'
    assert messages[2] == "tool 'calculator': arguments must be a JSON object, got list"
    assert messages[3] == "unknown tool 'rm_rf' (available: calculator, python)"
    assert out.errors[0].raw.startswith('{"name": "calculator"')
    assert out.errors[3].to_dict() == {"type": "tool_call_error", "message": messages[3],
                                       "raw": '{"name": "rm_rf", "arguments": {}}'}


def test_a_call_cut_off_by_the_token_limit_is_an_error_even_when_streamed():
    text = 'Sure.\n<tool_call>\n{"name": "python", "arguments": {"code": "while True: pa'
    content, calls, errors, result = stream(text, list(range(0, len(text), 3)))
    assert content == "Sure." and result.tool_calls == []
    assert len(errors) == 1 and "unterminated <tool_call>" in errors[0].message
    # Its first part had gone out, so the error names the index the client must drop.
    assert errors[0].index == 0 and calls[0][0].name == "python"
    assert result.errors == [] and result.cut == errors[0]  # incomplete, not malformed: no call, no error


def test_the_calls_before_one_cut_by_the_token_limit_stand_and_the_cut_one_is_left_out():
    """SmolLM2 with parallel calls allowed repeats a call until max_tokens: the reply keeps the complete calls
    (a vLLM parser's reply), the turn's finish_reason stays the verifier's "length"."""
    hermes = f"{CALC}\n{CALC}\n" + '<tool_call>\n{"name": "calculator", "arguments": {"expression": "2 *'
    llama = '{"name": "calculator", "parameters": {"expression": "1"}}; {"name": "calculator", "parameters": {"ex'
    for text, fmt in [(hermes, "hermes"), (llama, "llama3"), (llama[:-4], "llama3")]:
        out = parse_tool_calls(text, fmt, {"calculator"})
        assert len(out.tool_calls) == 2 - (fmt == "llama3") and out.errors == [], (text, out)
        assert out.cut is not None and out.finish_reason is None and out.content == ""
    whole = parse_tool_calls(f"{CALC}\n{CALC}", "hermes", {"calculator"})
    assert whole.cut is None and whole.finish_reason == "tool_calls"
    # a call cut before its name is whole is left out as well; a malformed call stays an error
    assert parse_tool_calls(f'{CALC}\n<tool_call>\n{{"na').cut is not None
    broken = parse_tool_calls('{"name": "calculator", "parameters": {"expression": 1]}', "llama3")
    assert broken.cut is None and broken.tool_calls == [] and len(broken.errors) == 1


def test_double_encoded_arguments_and_other_key_orders_are_accepted_streamed_or_not():
    for text in ['<tool_call>{"name": "calculator", "arguments": "{\\"expression\\": \\"1\\"}"}</tool_call>',
                 '<tool_call>{"arguments": {"expression": "1"}, "name": "calculator"}</tool_call>']:
        assert parse_tool_calls(text).tool_calls[0].arguments == '{"expression": "1"}'
        _, calls, errors, result = stream(text, list(range(len(text))))
        assert errors == [] and result.tool_calls[0].arguments == '{"expression": "1"}'
        assert calls[0][0].name == "calculator" and calls[0][0].arguments == '{"expression": "1"}'


def test_keys_after_the_arguments_are_refused_streamed_or_not():
    text = '<tool_call>{"name": "calculator", "arguments": {"expression": "1"}, "name": "python"}</tool_call>'
    message = 'a tool call must be {"name": ..., "arguments": {...}} with nothing after the arguments'
    assert [e.message for e in parse_tool_calls(text).errors] == [message]
    _, calls, errors, result = stream(text, list(range(len(text))))
    assert result.tool_calls == [] and [(e.message, e.index) for e in errors] == [(message, 0)]


def test_llama3_json_calls():
    tagged = parse_tool_calls('<|python_tag|>{"name": "calculator", "parameters": {"expression": "1+1"}}',
                              fmt="llama3")
    assert [(c.name, json.loads(c.arguments)) for c in tagged.tool_calls] == [("calculator", {"expression": "1+1"})]
    two = parse_tool_calls('{"name": "a", "parameters": {}}; {"name": "b", "arguments": {"k": 1}}', fmt="llama3")
    assert [(c.name, c.arguments) for c in two.tool_calls] == [("a", "{}"), ("b", '{"k": 1}')]
    # A JSON answer that is not a call stays content; a tagged broken call is an error.
    assert parse_tool_calls('{"answer": 42}', fmt="llama3").content == '{"answer": 42}'
    broken = parse_tool_calls('<|python_tag|>{"name": "calculator", "parameters": {]}', fmt="llama3")
    assert broken.tool_calls == [] and broken.errors[0].message.startswith("tool call is not valid JSON")
    # one the text ended inside (max_tokens) is incomplete rather than broken: neither a call nor an error
    cut = parse_tool_calls('<|python_tag|>{"name": "calculator", "parameters": {', fmt="llama3")
    assert cut.tool_calls == [] and cut.errors == [] and cut.cut is not None
    assert parse_tool_calls("Paris is the capital.", fmt="llama3").content == "Paris is the capital."


def test_auto_picks_the_format_from_the_text():
    assert parse_tool_calls('{"name": "x", "parameters": {}}', fmt="auto").tool_calls[0].name == "x"
    assert parse_tool_calls(f"ok {CALC}", fmt="auto").tool_calls[0].name == "calculator"
    content, calls, errors, _ = stream('<|python_tag|>{"name": "x", "parameters": {"a": 1}}', [1, 5, 20], fmt="auto")
    assert content == "" and calls[0][0].name == "x" and calls[0][0].arguments == '{"a": 1}'
    # A reply that opens with JSON but then makes a hermes call: the call is still found.
    mixed = parse_tool_calls('{"plan": "compute"}\n' + CALC, fmt="auto")
    assert mixed.content == '{"plan": "compute"}' and mixed.tool_calls[0].name == "calculator"


PIECES = [
    "Let me check.", "\n", "  ", "x < y", "<tool", CALC, PY,
    '<tool_call>\n{"name": "calculator", "arguments": {"expression": }\n</tool_call>',
    '<tool_call>{"arguments": {"a": 1}, "name": "python"}</tool_call>',
    '<tool_call>{"name": "python", "arguments": "{\\"code\\": \\"1\\"}"}</tool_call>',
    '<tool_call>{"name": "python", "arguments": {"code": "1"}, "name": "calculator"}</tool_call>',
    "done {ok}",
]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(PIECES), min_size=1, max_size=6), st.lists(st.integers(0, 400), max_size=30))
def test_any_chunking_streams_the_same_message_as_a_whole_parse(pieces, cuts):
    text = "".join(pieces)
    whole = parse_tool_calls(text, id_factory=ids())
    content, calls, errors, result = stream(text, cuts)
    assert content == whole.content == result.content
    assert TOOL_CALL_MARKUP.search(content) is None
    assert [(c.name, c.arguments) for c in result.tool_calls] == [(c.name, c.arguments) for c in whole.tool_calls]
    assert [e.message for e in errors] == [e.message for e in whole.errors]
    # Every valid call's streamed pieces reassemble into exactly its arguments.
    refused = {e.index for e in errors if e.index is not None}
    streamed = [(p[0].name, "".join(x.arguments for x in p)) for i, p in sorted(calls.items()) if i not in refused]
    assert streamed == [(c.name, c.arguments) for c in result.tool_calls]


TOOL_CALL_MARKUP = re.compile(r"</?tool_call>")


FRAGMENTS = st.sampled_from(["<tool_call>", "</tool_call>", "<tool", "_call>", "{", "}", '"name"', '"arguments"',
                             ":", ",", '"calculator"', "[", "]", "\n", " ", "x", '"', "\\", "<|python_tag|>", "1"])


@settings(max_examples=300, deadline=None)
@given(st.lists(FRAGMENTS, max_size=40), st.lists(st.integers(0, 200), max_size=20),
       st.sampled_from(["hermes", "llama3", "auto"]))
def test_garbage_never_raises_and_never_depends_on_chunking(fragments, cuts, fmt):
    text = "".join(fragments)
    whole = parse_tool_calls(text, fmt=fmt, id_factory=ids())
    content, calls, errors, result = stream(text, cuts, fmt=fmt)
    assert content == whole.content
    assert [(c.name, c.arguments) for c in result.tool_calls] == [(c.name, c.arguments) for c in whole.tool_calls]
    assert [e.message for e in errors] == [e.message for e in whole.errors]
    for call in whole.tool_calls:
        assert isinstance(json.loads(call.arguments), dict)


def test_a_closing_marker_inside_an_argument_string_does_not_end_the_call():
    """A sampled reply wrote `</tool_call>` inside a city name (the grammar allows any text in a string)."""
    text = '<tool_call>\n{"name": "book", "arguments": {"city": "Oslo</tool_call>\\"x"}}\n</tool_call>'
    for cuts in ([], list(range(0, len(text), 5))):
        content, calls, errors, result = stream(text, cuts)
        assert errors == [] and content == "", (cuts, errors)
        assert [json.loads(c.arguments) for c in result.tool_calls] == [{"city": 'Oslo</tool_call>"x'}]
