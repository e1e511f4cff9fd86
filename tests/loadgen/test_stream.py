"""Parsing OpenAI-format streams: the recorded fixtures are folded both by our accumulator and by the openai SDK's
own stream state, and the two must agree on the message, the tool calls, the finish reason and the usage."""

import json

import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletionChunk

from specrelay.loadgen.stream import ChatStreamAccumulator, SseDecoder, StreamError, usage_pte


def fold(path):
    """Feed the file line by line, as aiohttp hands lines over; the i-th event arrives at t = i."""
    decoder, acc, payloads = SseDecoder(), ChatStreamAccumulator(), []
    with open(path, "rb") as f:
        for line in f:
            for payload in decoder.feed(line):
                payloads.append(payload)
                acc.feed_payload(payload, float(len(payloads)))
    return acc, payloads


def sdk_fold(payloads):
    state = ChatCompletionStreamState()
    for payload in payloads:
        if payload != "[DONE]":
            state.handle_chunk(ChatCompletionChunk.model_validate_json(payload))
    return state.current_completion_snapshot


def test_text_stream_matches_the_openai_sdk(fixture_path):
    acc, payloads = fold(fixture_path("openai_text_stream.txt"))
    snap = sdk_fold(payloads)
    assert acc.done
    assert acc.content == snap.choices[0].message.content == "The capital of France is Paris. It is known"
    assert acc.finish_reason == snap.choices[0].finish_reason == "stop"
    assert acc.usage["completion_tokens"] == snap.usage.completion_tokens == 10
    assert acc.usage["prompt_tokens"] == 19
    assert acc.tool_calls == {}
    # Tokens arrived in events 2..11 (the role-only first chunk and the finish/usage chunks carry none).
    assert acc.token_times == [float(i) for i in range(2, 12)]
    assert acc.assistant_message() == {"role": "assistant", "content": "The capital of France is Paris. It is known"}


def test_tool_call_deltas_match_the_openai_sdk(fixture_path):
    acc, payloads = fold(fixture_path("openai_tool_call_stream.txt"))
    snap = sdk_fold(payloads)
    sdk_calls = snap.choices[0].message.tool_calls
    assert acc.finish_reason == snap.choices[0].finish_reason == "tool_calls"
    assert [c.as_message() for _, c in sorted(acc.tool_calls.items())] == [
        {"id": c.id, "type": c.type, "function": {"name": c.function.name, "arguments": c.function.arguments}}
        for c in sdk_calls
    ]
    assert json.loads(acc.tool_calls[0].arguments) == {"location": "Paris, France"}
    assert acc.tool_calls[1].name == "get_time"
    assert acc.usage["completion_tokens"] == snap.usage.completion_tokens == 51
    message = acc.assistant_message()
    assert message["content"] is None and [c["id"] for c in message["tool_calls"]] == [
        "call_DdmO9pD3xa9XTPNJ32zg2hcA", "call_f3kcB9hJ4tXl0rZ8vFQ2WnNs"]
    # Every fragment, the first (role + call header) included, is a token-carrying chunk.
    assert len(acc.token_times) == 10


def test_sse_decoder_follows_the_event_stream_rules():
    d = SseDecoder()
    lines = [b": keep-alive\n", b"event: message\n", b"data:{\"a\":\n", b"data: 1}\r\n", b"\n", b"\n",
             b"data: [DONE]\n", b"\n"]
    events = [p for line in lines for p in d.feed(line)]
    assert events == ['{"a":\n1}', "[DONE]"]


def test_sse_decoder_flushes_an_unterminated_last_event():
    d = SseDecoder()
    assert list(d.feed(b"data: [DONE]")) == []
    assert list(d.flush()) == ["[DONE]"]


def test_an_error_chunk_raises_with_the_servers_message():
    acc = ChatStreamAccumulator()
    with pytest.raises(StreamError, match="model overloaded"):
        acc.feed_payload('{"error": {"message": "model overloaded", "type": "server_error"}}', 0.0)
    with pytest.raises(StreamError, match="not JSON"):
        acc.feed_payload("{broken", 0.0)


def test_reasoning_content_counts_as_tokens_for_timing():
    acc = ChatStreamAccumulator()
    acc.feed_chunk({"choices": [{"index": 0, "delta": {"reasoning_content": "hmm"}}]}, 1.0)
    acc.feed_chunk({"choices": [{"index": 0, "delta": {"content": "ok"}, "finish_reason": "stop"}]}, 2.0)
    assert acc.token_times == [1.0, 2.0] and acc.reasoning == "hmm" and acc.content == "ok"


@pytest.mark.parametrize("usage, expected", [
    ({"completion_tokens": 3}, (None, None)),
    ({"pte": 123.5}, (123.5, None)),
    ({"pte": {"total": 80, "prefill": 70, "decode": 10.0}}, (80.0, {"total": 80.0, "prefill": 70.0, "decode": 10.0})),
    ({"pte": {"prefill": 70}}, (None, None)),
    ({"pte": "lots"}, (None, None)),
    ({"pte": True}, (None, None)),
    (None, (None, None)),
])
def test_usage_pte_accepts_a_number_or_an_object_with_total(usage, expected):
    assert usage_pte(usage) == expected
