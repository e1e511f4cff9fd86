"""The gateway over HTTP in front of the fake verifier: what reaches the verifier, what the client sees, and that
every early end (stop string, disconnect, timeout) cancels the request and frees its KV blocks."""

from __future__ import annotations

import asyncio
import json
import time

from specrelay.services.gateway.state import GATEWAY
from specrelay.shared.messages import GENERATE_STREAM

MODEL = "tiny-chat"
HELLO = [{"role": "user", "content": "Hello there"}]
TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def events(text: str) -> list:
    data = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


def streamed_text(chunks: list[dict]) -> str:
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


async def wait_for(condition, timeout_s: float = 3.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


async def test_sampling_and_slo_fields_reach_the_verifier(gateway, tokenizer):
    before_ms = time.time() * 1000
    response = await gateway.client.post(
        "/v1/chat/completions", headers={"X-SLO-Class": "deadline", "X-Deadline-Ms": "2500"},
        json={"model": MODEL, "messages": HELLO, "max_completion_tokens": 7, "temperature": 0.7, "top_p": 0.9,
              "seed": 11, "top_k": 5})
    assert response.status == 200
    g = gateway.fake.generates[-1]
    assert g.request_id == (await response.json())["id"]
    assert (g.sampling.max_tokens, g.sampling.temperature, g.sampling.top_p, g.sampling.seed, g.sampling.top_k) \
        == (7, 0.7, 0.9, 11, 5)
    assert tokenizer.eos_token_id in g.sampling.stop_token_ids
    assert g.model == MODEL and g.slo_class == "deadline"
    assert before_ms + 2500 <= g.deadline_ms <= time.time() * 1000 + 2500
    assert tokenizer.decode(g.prompt_token_ids) == "<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n"
    # body fields win over headers
    await gateway.client.post("/v1/chat/completions", headers={"X-SLO-Class": "deadline"},
                              json={"model": MODEL, "messages": HELLO, "max_tokens": 2, "slo_class": "batch"})
    assert gateway.fake.generates[-1].slo_class == "batch"
    assert gateway.fake.generates[-1].deadline_ms is None


async def test_stop_string_cuts_the_text_and_cancels_the_verifier(gateway):
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 200, "stop": ["robots"]}
    response = await gateway.client.post("/v1/chat/completions", json=body)
    data = await response.json()
    choice = data["choices"][0]
    assert choice["message"]["content"] == "Once upon a time, a café in Zürich served naïve crêpes to 12 "
    assert choice["finish_reason"] == "stop"
    request_id = data["id"]
    assert request_id in gateway.fake.cancels
    await wait_for(lambda: gateway.fake.blocks_used == 0)
    # billed up to the token that completed the stop string, not the verifier's whole run
    assert 0 < data["usage"]["completion_tokens"] < 40
    streamed = await gateway.client.post("/v1/chat/completions", json={**body, "stream": True})
    chunks = events(await streamed.text())
    assert streamed_text(chunks) == choice["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


async def test_client_disconnect_mid_stream_cancels_and_frees_kv_blocks(make_gateway):
    async with make_gateway(delay_s=0.05, tokens_per_chunk=1) as h:
        response = await h.client.post("/v1/chat/completions", json={
            "model": MODEL, "messages": HELLO, "max_tokens": 300, "stream": True})
        seen = 0
        async for line in response.content:
            seen += line.startswith(b"data: ")
            if seen == 4:
                break
        request_id = h.fake.generates[-1].request_id
        assert h.fake.blocks[request_id] > 0
        response.close()  # the client goes away mid-answer
        await wait_for(lambda: request_id in h.fake.cancels)
        await wait_for(lambda: h.fake.blocks_used == 0)
        assert h.fake.finished[request_id] == "cancelled"
        metrics = await (await h.client.get("/metrics")).text()
        assert "specrelay_kv_blocks_used 0.0\n" in metrics
        assert 'specrelay_request_finish_total{reason="client_gone"} 1' in metrics
        assert h.app[GATEWAY].admission.num_running == 0


async def test_a_silent_verifier_times_out_with_504_and_is_cancelled(make_gateway):
    async with make_gateway(chunk_timeout_s=0.5) as h:
        response = await h.client.post("/v1/chat/completions", json={
            "model": MODEL, "messages": [{"role": "user", "content": "SILENT please"}]})
        assert response.status == 504
        assert (await response.json())["error"]["code"] == "timeout"
        assert h.fake.generates[-1].request_id in h.fake.cancels


async def test_tool_choice_function_forces_that_call(gateway, tokenizer):
    response = await gateway.client.post("/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "Tell me a story"}], "tools": [TOOL],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}}})
    choice = (await response.json())["choices"][0]
    prompt = tokenizer.decode(gateway.fake.generates[-1].prompt_token_ids)
    assert prompt.endswith('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": ')
    assert choice["finish_reason"] == "tool_calls"
    [call] = choice["message"]["tool_calls"]
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert call["id"].startswith("call_") and choice["message"]["content"] is None


async def test_tool_choice_required_and_none(gateway, tokenizer):
    required = await gateway.client.post("/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "Tell me a story"}], "tools": [TOOL],
        "tool_choice": "required", "stream": True})
    chunks = events(await required.text())
    calls = [tc for c in chunks for tc in c["choices"][0]["delta"].get("tool_calls") or []]
    assert calls[0]["function"]["name"] == "get_weather" and calls[0]["index"] == 0
    assert json.loads("".join(c["function"]["arguments"] for c in calls)) == {"city": "Paris"}
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    none = await gateway.client.post("/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "weather in Paris?"}], "tools": [TOOL],
        "tool_choice": "none", "max_tokens": 12})
    assert "<tools>" not in tokenizer.decode(gateway.fake.generates[-1].prompt_token_ids)
    message = (await none.json())["choices"][0]["message"]
    assert "tool_calls" not in message and message["content"].startswith("Once upon")


async def test_a_malformed_tool_call_is_reported_not_raised(gateway):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "BROKEN weather"}], "tools": [TOOL]}
    message = (await (await gateway.client.post("/v1/chat/completions", json=body)).json())["choices"][0]
    assert message["finish_reason"] == "stop"
    assert message["message"]["content"] == "Let me look."
    [error] = message["message"]["tool_call_errors"]
    assert "not valid JSON" in error["message"] and '"city": }' in error["raw"]
    chunks = events(await (await gateway.client.post("/v1/chat/completions", json={**body, "stream": True})).text())
    assert streamed_text(chunks) == "Let me look."
    errors = [e for c in chunks for e in c["choices"][0]["delta"].get("tool_call_errors") or []]
    assert errors[0]["message"] == error["message"]


async def test_completions_endpoint(gateway, tokenizer):
    response = await gateway.client.post("/v1/completions", json={
        "model": MODEL, "prompt": "Hello there", "max_tokens": 6, "stop": "\n"})
    data = await response.json()
    assert data["object"] == "text_completion"
    [choice] = data["choices"]
    assert choice["finish_reason"] == "length" and choice["text"].startswith("Once upon")
    assert data["usage"]["completion_tokens"] == 6
    ids = tokenizer.encode("Hello there")
    stream = await gateway.client.post("/v1/completions", json={
        "model": MODEL, "prompt": ids, "max_tokens": 6, "stream": True, "stream_options": {"include_usage": True}})
    chunks = events(await stream.text())
    assert gateway.fake.generates[-1].prompt_token_ids == ids
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == choice["text"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == len(ids) + 6


async def test_models_health_and_metrics(gateway):
    models = await (await gateway.client.get("/v1/models")).json()
    assert [m["id"] for m in models["data"]] == [MODEL] and models["object"] == "list"
    assert (await (await gateway.client.get(f"/v1/models/{MODEL}")).json())["max_model_len"] == 512
    assert (await (await gateway.client.get("/health")).json())["status"] == "ok"
    await gateway.client.post("/v1/chat/completions", json={"model": MODEL, "messages": HELLO, "max_tokens": 5})
    await gateway.bus.publish(GENERATE_STREAM + ".unused", gateway.fake.generates[-1])  # other streams don't count
    await asyncio.sleep(0.1)
    response = await gateway.client.get("/metrics")
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    text = await response.text()
    assert 'specrelay_requests_total{endpoint="/v1/chat/completions",status="200"} 1' in text
    assert 'specrelay_request_finish_total{reason="length"} 1' in text
    assert "specrelay_ttft_seconds_count 1" in text and "specrelay_tpot_seconds_count 1" in text
    assert "specrelay_completion_tokens_total 5" in text
    assert "specrelay_prompt_tokens_cached_total 8" in text
    assert "specrelay_spec_acceptance_rate 0.4" in text  # the fake accepts len // 2 of len drafted: 2 of 5
    assert "specrelay_verifier_queue_depth 0" in text  # the one Generate was served: nothing waits
    assert "specrelay_queue_depth 0" in text and "specrelay_requests_running 0" in text


async def test_tokens_replayed_after_a_redelivery_are_not_shown_twice(make_gateway):
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 30}
    async with make_gateway() as plain:
        expected = (await (await plain.client.post("/v1/chat/completions", json=body)).json())
    async with make_gateway(replay_at=7) as h:
        replayed = await (await h.client.post("/v1/chat/completions", json=body)).json()
        streamed = events(await (await h.client.post("/v1/chat/completions", json={**body, "stream": True})).text())
    text = expected["choices"][0]["message"]["content"]
    assert replayed["choices"][0]["message"]["content"] == text
    assert streamed_text(streamed) == text
