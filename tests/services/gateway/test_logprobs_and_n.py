"""logprobs, logit_bias and n through the gateway (the fake verifier reports output token i at logprob -i/100, its
k alternatives after it): OpenAI's shapes, streamed and whole, what reaches the verifier, and the 400s."""

from __future__ import annotations

import json

import pytest

MODEL = "tiny-chat"  # conftest's
HELLO = [{"role": "user", "content": "Hello there"}]
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


def sse_events(text: str) -> list[dict]:
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ") and line != "data: [DONE]"]


async def post(gateway, path: str, **body) -> dict:
    response = await gateway.client.post(path, json={"model": MODEL, **body})
    assert response.status == 200, await response.text()
    return await response.json()


async def stream(gateway, path: str, **body) -> list[dict]:
    response = await gateway.client.post(path, json={"model": MODEL, "stream": True, **body})
    assert response.status == 200, await response.text()
    return sse_events(await response.text())


def assert_chat_entries(entries: list[dict], tokenizer, num_tokens: int, k: int) -> None:
    assert len(entries) == num_tokens
    for i, entry in enumerate(entries):
        assert entry["logprob"] == pytest.approx(-i / 100)
        assert entry["bytes"] == list(entry["token"].encode())
        assert len(entry["top_logprobs"]) == k
        assert [t["logprob"] for t in entry["top_logprobs"]] == sorted((t["logprob"] for t in entry["top_logprobs"]),
                                                                      reverse=True)
        if k:
            assert entry["top_logprobs"][0]["token"] == entry["token"]


async def test_chat_logprobs_whole_and_streamed_are_the_same_tokens(gateway, tokenizer):
    body = {"messages": HELLO, "max_tokens": 10, "logprobs": True, "top_logprobs": 3}
    whole = await post(gateway, "/v1/chat/completions", **body)
    assert gateway.fake.generates[-1].sampling.logprobs == 3
    [choice] = whole["choices"]
    entries = choice["logprobs"]["content"]
    assert_chat_entries(entries, tokenizer, whole["usage"]["completion_tokens"], 3)
    assert "".join(e["token"] for e in entries) == choice["message"]["content"]
    chunks = await stream(gateway, "/v1/chat/completions", **body)
    streamed = [e for c in chunks for ch in c["choices"] if ch["logprobs"] for e in ch["logprobs"]["content"]]
    assert streamed == entries


async def test_chat_logprobs_without_top_logprobs_list_none(gateway, tokenizer):
    whole = await post(gateway, "/v1/chat/completions", messages=HELLO, max_tokens=4, logprobs=True)
    assert gateway.fake.generates[-1].sampling.logprobs == 0
    assert_chat_entries(whole["choices"][0]["logprobs"]["content"], tokenizer, 4, 0)
    plain = await post(gateway, "/v1/chat/completions", messages=HELLO, max_tokens=4)
    assert plain["choices"][0]["logprobs"] is None and gateway.fake.generates[-1].sampling.logprobs is None


async def test_completion_logprobs_in_the_legacy_shape(gateway, tokenizer):
    body = {"prompt": "Once", "max_tokens": 8, "logprobs": 2}
    whole = await post(gateway, "/v1/completions", **body)
    [choice] = whole["choices"]
    lp = choice["logprobs"]
    assert gateway.fake.generates[-1].sampling.logprobs == 2
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == 8
    assert lp["token_logprobs"] == pytest.approx([-i / 100 for i in range(8)])
    assert "".join(lp["tokens"]) == choice["text"]
    assert lp["text_offset"] == [len("".join(lp["tokens"][:i])) for i in range(8)]
    for token, top in zip(lp["tokens"], lp["top_logprobs"]):
        assert token in top and 1 <= len(top) <= 3  # the 2 most likely and the chosen one
    chunks = await stream(gateway, "/v1/completions", **body)
    parts = [ch["logprobs"] for c in chunks for ch in c["choices"] if ch["logprobs"]]
    assert sum((p["tokens"] for p in parts), []) == lp["tokens"]
    assert sum((p["text_offset"] for p in parts), []) == lp["text_offset"]


async def test_logit_bias_reaches_the_verifier_as_token_ids(gateway):
    await post(gateway, "/v1/chat/completions", messages=HELLO, max_tokens=2, logit_bias={"5": 2.5, "7": -100, "9": 0})
    assert gateway.fake.generates[-1].sampling.logit_bias == {5: 2.5, 7: -100.0}


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", {"messages": HELLO}),
    ("/v1/completions", {"prompt": "Once"}),
])
async def test_n_choices_each_generated_with_its_own_seed_and_usage_summed(gateway, path, body):
    one = await post(gateway, path, **body, max_tokens=5, seed=7)
    several = await post(gateway, path, **body, max_tokens=5, seed=7, n=3)
    generates = gateway.fake.generates[-3:]
    assert len({g.request_id for g in generates}) == 3
    assert sorted(g.sampling.seed for g in generates) == [7, 8, 9]  # choice i: seed + i
    assert [c["index"] for c in several["choices"]] == [0, 1, 2]
    key = "message" if "messages" in body else "text"
    assert all(c[key] == one["choices"][0][key] for c in several["choices"])  # the fake answers alike
    usage = several["usage"]
    assert usage["prompt_tokens"] == one["usage"]["prompt_tokens"]  # the prompt once, as OpenAI counts it
    assert usage["completion_tokens"] == 3 * one["usage"]["completion_tokens"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


async def test_n_streamed_chat_interleaves_choices_that_reassemble(gateway):
    whole = await post(gateway, "/v1/chat/completions", messages=HELLO, max_tokens=9, n=2, logprobs=True)
    chunks = await stream(gateway, "/v1/chat/completions", messages=HELLO, max_tokens=9, n=2, logprobs=True,
                          stream_options={"include_usage": True})
    for index in (0, 1):
        mine = [ch for c in chunks for ch in c["choices"] if ch["index"] == index]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert "".join(ch["delta"].get("content", "") for ch in mine) == whole["choices"][index]["message"]["content"]
        assert [ch["finish_reason"] for ch in mine if ch["finish_reason"]] == ["length"]
        entries = [e for ch in mine if ch["logprobs"] for e in ch["logprobs"]["content"]]
        assert entries == whole["choices"][index]["logprobs"]["content"]
        assert [e["logprob"] for e in entries] == pytest.approx([-i / 100 for i in range(9)])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 18


async def test_n_with_tools_and_response_format(gateway):
    calls = await post(gateway, "/v1/chat/completions", max_tokens=40, n=2, tools=[WEATHER_TOOL],
                       messages=[{"role": "user", "content": "What's the weather in Paris?"}])
    for choice in calls["choices"]:
        assert choice["finish_reason"] == "tool_calls"
        assert json.loads(choice["message"]["tool_calls"][0]["function"]["arguments"]) == {"city": "Paris"}
    await post(gateway, "/v1/chat/completions", messages=HELLO, max_tokens=5, n=2,
               response_format={"type": "json_object"})
    assert all(g.sampling.grammar for g in gateway.fake.generates[-2:])


@pytest.mark.parametrize("path,body,param", [
    ("/v1/chat/completions", {"messages": HELLO, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": HELLO, "top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": HELLO, "n": 0}, "n"),
    ("/v1/chat/completions", {"messages": HELLO, "n": 1000}, "n"),
    ("/v1/chat/completions", {"messages": HELLO, "logit_bias": {"abc": 1}}, "logit_bias"),
    ("/v1/chat/completions", {"messages": HELLO, "logit_bias": {"5": 1e9}}, "logit_bias"),
    ("/v1/completions", {"prompt": "Hi", "logprobs": 6}, "logprobs"),
    ("/v1/completions", {"prompt": "Hi", "n": 17}, "n"),
])
async def test_hostile_values_are_400s_naming_the_field_and_the_server_goes_on(gateway, path, body, param):
    response = await gateway.client.post(path, json={"model": MODEL, **body})
    assert response.status == 400, await response.text()
    assert (await response.json())["error"]["param"] == param
    assert not gateway.fake.generates
    await post(gateway, path, **{k: v for k, v in body.items() if k in ("messages", "prompt")}, max_tokens=2)


def test_n_usage_sums_the_work_and_keeps_what_describes_the_verifier():
    from specrelay.services.gateway.streamer import summed_usage

    def usage(completion: int, cached: int) -> dict:
        return {"prompt_tokens": 100, "completion_tokens": completion, "total_tokens": 100 + completion,
                "prompt_tokens_details": {"cached_tokens": cached}, "spec_steps": completion,
                "pte": {"total": 100.0 + completion, "prefill": 100.0, "gamma": 0.2, "beta": 0.0,
                        "source": "analytic", "turns": 1}}

    summed = summed_usage([usage(4, 0), usage(6, 96), usage(5, 96)])
    assert summed["prompt_tokens"] == 100 and summed["prompt_tokens_details"] == {"cached_tokens": 0}
    assert summed["completion_tokens"] == summed["spec_steps"] == 15 and summed["total_tokens"] == 115
    assert summed["pte"] == {"total": 315.0, "prefill": 300.0, "gamma": 0.2, "beta": 0.0, "source": "analytic",
                             "turns": 3}
    # choice 0 copied the prompt's KV from choice 1 (the verifier prefilled it once): the prompt was not cached
    assert summed_usage([usage(4, 100), usage(6, 0)])["prompt_tokens_details"] == {"cached_tokens": 0}
