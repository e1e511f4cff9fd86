"""/metrics as a scraper reads it: Prometheus' own parser, vLLM's names with `model_name`, our series beside them."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from specrelay.services.gateway.metrics import GatewayMetrics, InterTokenLatency, KvStats, parse_samples

MODEL = "tiny-chat"  # conftest's
HELLO = [{"role": "user", "content": "Hello there"}]
VLLM_SERIES = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:time_to_first_token_seconds",
               "vllm:inter_token_latency_seconds", "vllm:request_time_per_output_token_seconds",
               "vllm:e2e_request_latency_seconds", "vllm:prompt_tokens", "vllm:generation_tokens",
               "vllm:spec_decode_num_drafts", "vllm:spec_decode_num_draft_tokens",
               "vllm:spec_decode_num_accepted_tokens", "vllm:num_preemptions", "vllm:prefix_cache_queries",
               "vllm:prefix_cache_hits", "vllm:request_success", "vllm:kv_cache_usage_perc")


def test_gateway_metrics_derive_rates_and_read_kv_stats_at_scrape():
    used = [3]
    m = GatewayMetrics(kv_stats=lambda: KvStats(blocks_used=used[0], blocks_total=64), model_name="m")
    m.drafted.inc(10)
    m.accepted.inc(7)
    m.prompt_tokens.inc(200)
    m.cached_tokens.inc(50)
    samples = parse_samples(m.render().decode())
    assert samples["specrelay_spec_acceptance_rate"] == 0.7
    assert samples["specrelay_kv_reuse_rate"] == 0.25
    assert samples["specrelay_kv_blocks_used"] == 3 and samples["specrelay_kv_blocks_total"] == 64
    assert samples['vllm:kv_cache_usage_perc{model_name="m"}'] == 3 / 64
    used[0] = 0
    assert parse_samples(m.render().decode())["specrelay_kv_blocks_used"] == 0
    bare = parse_samples(GatewayMetrics().render().decode())  # no verifier here: no made-up gauge
    assert not any(name.startswith(("specrelay_kv_blocks", "vllm:kv_cache")) for name in bare)


def test_counters_take_labels_as_keywords_only_go_up_and_check_their_labels():
    m = GatewayMetrics()
    m.tool_fallbacks.inc(reason='a"b\\c\nd')  # escaped by prometheus-client, read back intact by the parser
    [family] = [f for f in text_string_to_metric_families(m.render().decode()) if f.name == "specrelay_tool_fallbacks"]
    assert [(s.labels, s.value) for s in family.samples if s.name.endswith("_total")] == [
        ({"reason": 'a"b\\c\nd'}, 1.0)]
    with pytest.raises(ValueError):
        m.rejected.inc(-1)
    with pytest.raises(ValueError):
        m.tool_fallbacks.inc(reason="x", other="y")


def test_inter_token_latency_is_per_token_and_sums_to_last_minus_first_token():
    class Hist:
        values: list[float] = []

        def observe(self, v: float) -> None:
            self.values.append(v)

    now = [10.0]
    itl = InterTokenLatency(Hist(), clock=lambda: now[0])
    itl.arrived(2)  # the first chunk: its tokens are in TTFT
    now[0] = 10.3
    itl.arrived(5)  # three tokens in one verify step
    now[0] = 10.4
    itl.arrived(5)  # text held back (a stop string's prefix): no new token
    itl.arrived(6)
    assert Hist.values == pytest.approx([0.1, 0.1, 0.1, 0.1])
    assert sum(Hist.values) == pytest.approx(10.4 - 10.0)


async def _scrape(gateway) -> tuple[dict[str, float], set[str]]:
    response = await gateway.client.get("/metrics")
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    text = await response.text()
    return parse_samples(text), {f.name for f in text_string_to_metric_families(text)}


async def test_vllm_named_series_exist_with_model_name_and_move_after_a_request(gateway):
    before, families = await _scrape(gateway)
    assert set(VLLM_SERIES) <= families
    assert before[f'vllm:num_preemptions_total{{model_name="{MODEL}"}}'] == 0
    response = await gateway.client.post("/v1/chat/completions", json={"model": MODEL, "messages": HELLO,
                                                                       "max_tokens": 5})
    usage = (await response.json())["usage"]
    after, _ = await _scrape(gateway)

    def moved(name: str, **labels: str) -> float:
        key = name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted({"model_name": MODEL, **labels}.items())) + "}"
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert moved("vllm:prompt_tokens_total") == usage["prompt_tokens"] == moved("vllm:prefix_cache_queries_total")
    assert moved("vllm:generation_tokens_total") == usage["completion_tokens"] == 5
    assert moved("vllm:prefix_cache_hits_total") == usage["prompt_tokens_details"]["cached_tokens"]
    assert moved("vllm:spec_decode_num_draft_tokens_total") == usage["drafted_tokens"] > 0
    assert moved("vllm:spec_decode_num_accepted_tokens_total") == usage["accepted_tokens"]
    assert moved("vllm:spec_decode_num_drafts_total") == usage["spec_steps"]
    for histogram in ("vllm:time_to_first_token_seconds", "vllm:e2e_request_latency_seconds",
                      "vllm:request_time_per_output_token_seconds"):
        assert moved(histogram + "_count") == 1
    assert 1 <= moved("vllm:inter_token_latency_seconds_count") <= 4  # per token after the first chunk
    assert moved("vllm:request_success_total", finished_reason="length") == 1
    assert after[f'vllm:num_requests_running{{model_name="{MODEL}"}}'] == 0
    assert after[f'vllm:num_requests_waiting{{model_name="{MODEL}"}}'] == 0
    # our own series beside them, under their names
    assert after['specrelay_requests_total{endpoint="/v1/chat/completions",status="200"}'] == 1
    assert after["specrelay_completion_tokens_total"] == 5


async def test_two_apps_in_one_process_keep_their_own_counts(make_gateway):
    async with make_gateway() as a, make_gateway() as b:
        await a.client.post("/v1/chat/completions", json={"model": MODEL, "messages": HELLO, "max_tokens": 3})
        (samples_a, _), (samples_b, _) = await _scrape(a), await _scrape(b)
    assert samples_a[f'vllm:generation_tokens_total{{model_name="{MODEL}"}}'] == 3
    assert samples_b[f'vllm:generation_tokens_total{{model_name="{MODEL}"}}'] == 0
