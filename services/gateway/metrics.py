"""The gateway's Prometheus metrics: vLLM's names (so vLLM dashboards work) beside specrelay's own series.

Built on prometheus-client, the library vLLM itself uses: its metric types, label handling, escaping and text
exposition are what Prometheus' own parser reads, so nothing here formats text by hand. Each app gets its own
`CollectorRegistry` (two apps in one process, as in tests, never share a count).

vLLM's series carry a `model_name` label, as vLLM's do. What each one means here:
- `vllm:num_requests_running` / `_waiting`: admitted and generating / waiting in the gateway's admission queue;
- `vllm:time_to_first_token_seconds`, `vllm:e2e_request_latency_seconds`: per request, arrival to first / last token;
- `vllm:inter_token_latency_seconds` (vLLM's is per token, so is ours): a chunk of k tokens that arrives g seconds
  after the previous one counts k observations of g / k (speculative decoding commits several tokens per step).
  Tokens of the first chunk are in TTFT. Per request, the observations sum to last token - first token;
- `vllm:request_time_per_output_token_seconds`: per request, (last - first token) / (tokens - 1);
- `vllm:prompt_tokens_total`, `vllm:generation_tokens_total`, `vllm:request_{prompt,generation}_tokens`;
- `vllm:prefix_cache_queries_total` / `_hits_total`: prompt tokens / those whose KV was reused (vLLM counts tokens);
- `vllm:spec_decode_num_drafts_total` (verify steps), `_num_draft_tokens_total`, `_num_accepted_tokens_total`;
- `vllm:num_preemptions_total`: running requests the SLO schedule paused to give their slot to one that could not
  wait (slo_policy.py); 0 under fcfs — a verifier admits a request only when its KV blocks fit, never evicting one;
- `vllm:request_success_total{finished_reason}`: stop (tool calls included) | length | abort (client gone, error,
  timeout);
- `vllm:kv_cache_usage_perc`: KV blocks in use / all, 0..1 (only when the verifier runs in this process).

Gauges the gateway does not own (KV blocks of an in-process verifier) come from a `KvStatsSource` read at scrape
time; derived rates (acceptance, reuse) are computed at scrape time too.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import prometheus_client as prom
from prometheus_client.parser import text_string_to_metric_families

if TYPE_CHECKING:
    from specrelay.services.gateway.generation import Finish, Timing

# Every name below is a legacy Prometheus name (colons included), so the 0.0.4 text format carries them unchanged
# (prometheus-client's generate_latest writes it; its newer releases label their default 1.0.0).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Latency buckets in seconds: TTFT spans queueing + prefill, TPOT one decode step of a small model to a large one.
TTFT_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TPOT_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)
E2E_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)


class Counter(prom.Counter):
    """prometheus-client's Counter, also taking its labels as keywords: `inc(2, reason="stop")`."""

    def inc(self, amount: float = 1.0, **labels: str) -> None:  # type: ignore[override]
        if labels:
            self.labels(**labels).inc(amount)
        else:
            super().inc(amount)


@dataclass(frozen=True)
class KvStats:
    blocks_used: int
    blocks_total: int
    blocks_kept: int = 0  # of blocks_used: conversations held across a tool pause, not running requests


KvStatsSource = Callable[[], KvStats]


class GatewayMetrics:
    def __init__(self, kv_stats: KvStatsSource | None = None, model_name: str = ""):
        self.kv_stats = kv_stats
        self.registry = r = prom.CollectorRegistry()
        # --- specrelay's own series (names kept: dashboards and tests read them) ---
        self.requests = Counter("specrelay_requests_total", "HTTP requests answered, by endpoint and status",
                                ("endpoint", "status"), registry=r)
        self.finished = Counter("specrelay_request_finish_total", "Generations finished, by finish reason",
                                ("reason",), registry=r)
        self.ttft = prom.Histogram("specrelay_ttft_seconds", "Arrival to the first token from the verifier",
                                   buckets=TTFT_BUCKETS_S, registry=r)
        self.tpot = prom.Histogram("specrelay_tpot_seconds", "Time per output token after the first, per request",
                                   buckets=TPOT_BUCKETS_S, registry=r)
        self.e2e = prom.Histogram("specrelay_e2e_seconds", "Arrival to the last token", buckets=E2E_BUCKETS_S,
                                  registry=r)
        self.prompt_tokens = Counter("specrelay_prompt_tokens_total", "Prompt tokens of finished generations",
                                     registry=r)
        self.cached_tokens = Counter("specrelay_prompt_tokens_cached_total",
                                     "Prompt tokens whose KV was reused, not prefilled", registry=r)
        self.completion_tokens = Counter("specrelay_completion_tokens_total", "Generated tokens billed", registry=r)
        self.spec_steps = Counter("specrelay_spec_steps_total", "Verify forwards", registry=r)
        self.drafted = Counter("specrelay_spec_drafted_tokens_total", "Draft tokens verified", registry=r)
        self.accepted = Counter("specrelay_spec_accepted_tokens_total", "Draft tokens the target accepted",
                                registry=r)
        self.relay_span = Counter("specrelay_relay_span_tokens_total",
                                  "Prompt tokens covered by relayed spans (RelayCaching)", registry=r)
        self.relay_reused = Counter("specrelay_relay_reused_tokens_total", "Relayed tokens whose K/V was reused",
                                    registry=r)
        self.relay_recomputed = Counter("specrelay_relay_recomputed_tokens_total",
                                        "Relayed tokens selected for recomputation", registry=r)
        self.pte = Counter("specrelay_pte_total", "Prefill token equivalents of finished generations, by part",
                           ("part",), registry=r)
        self._tool_series(r)
        self._load_gauges(r, with_kv=kv_stats is not None)
        self.vllm = VllmMetrics(r, model_name, with_kv=kv_stats is not None)

    def _tool_series(self, r: prom.CollectorRegistry) -> None:
        """Server-side tool rounds (tool_rounds.py) and the tool calls the parser found malformed."""
        self.tool_rounds = Counter("specrelay_tool_rounds_total",
                                   "Server-side tool rounds: the turn's tools ran and the model went on", registry=r)
        self.server_tool_calls = Counter("specrelay_server_tool_calls_total",
                                         "Server-side tool calls run, by tool and outcome (ok | error)",
                                         ("tool", "outcome"), registry=r)  # tool: a name of the server's registry
        self.tool_call_errors = Counter("specrelay_tool_call_errors_total",
                                        "Malformed tool calls, reported in message.tool_call_errors", registry=r)
        self.tool_fallbacks = Counter("specrelay_tool_fallbacks_total",
                                      "Tool rounds sent as a fresh Generate of the whole conversation, by reason "
                                      "(continue_error | continue_timeout | not_held)", ("reason",), registry=r)

    def _load_gauges(self, r: prom.CollectorRegistry, with_kv: bool) -> None:
        """What the gateway and an in-process verifier hold now (derived rates set at scrape time)."""
        self.acceptance = prom.Gauge("specrelay_spec_acceptance_rate", "Accepted / drafted tokens since start",
                                     registry=r)
        self.reuse = prom.Gauge("specrelay_kv_reuse_rate", "Cached / prompt tokens since start", registry=r)
        self.running = prom.Gauge("specrelay_requests_running", "Requests admitted and generating", registry=r)
        self.queued = prom.Gauge("specrelay_queue_depth", "Requests waiting for admission in the gateway",
                                 registry=r)
        self.verifier_queue = prom.Gauge("specrelay_verifier_queue_depth",
                                         "Generates waiting for or being served by the verifiers (sampled)",
                                         registry=r)
        self.rejected = Counter("specrelay_admission_rejected_total", "Requests refused with 503 (queue full)",
                                registry=r)
        if with_kv:  # no verifier in this process: no made-up gauge
            self.kv_used = prom.Gauge("specrelay_kv_blocks_used", "KV cache blocks in use (in-process verifier)",
                                      registry=r)
            self.kv_total = prom.Gauge("specrelay_kv_blocks_total", "KV cache blocks in all (in-process verifier)",
                                       registry=r)
            self.kv_kept = prom.Gauge("specrelay_kv_blocks_kept",
                                      "Of the blocks used, those of conversations held across a tool pause",
                                      registry=r)

    def set_load(self, num_running: int, num_waiting: int) -> None:
        self.running.set(num_running)
        self.queued.set(num_waiting)
        self.vllm.running.set(num_running)
        self.vllm.waiting.set(num_waiting)

    def observe(self, timing: Timing, reason: str, usage: dict[str, Any]) -> None:
        """A request that finished with `reason` (OpenAI's) and `usage` (OpenAI's, with specrelay's fields)."""
        m, v = self, self.vllm
        m.finished.inc(reason=reason)
        v.finished(reason)
        if timing.first_token_s is not None:
            for ours, theirs, seconds in ((m.ttft, v.ttft, timing.first_token_s - timing.arrival_s),
                                          (m.e2e, v.e2e, timing.last_token_s - timing.arrival_s)):
                ours.observe(seconds)
                theirs.observe(seconds)
            if usage["completion_tokens"] > 1:
                tpot_s = (timing.last_token_s - timing.first_token_s) / (usage["completion_tokens"] - 1)
                m.tpot.observe(tpot_s)
                v.tpot.observe(tpot_s)
        prompt, completion = usage["prompt_tokens"], usage["completion_tokens"]
        cached = usage["prompt_tokens_details"]["cached_tokens"]
        for counter, amount in ((m.prompt_tokens, prompt), (v.prompt_tokens, prompt), (v.prefix_queries, prompt),
                                (m.completion_tokens, completion), (v.generation_tokens, completion),
                                (m.cached_tokens, cached), (v.prefix_hits, cached)):
            counter.inc(amount)
        v.request_prompt_tokens.observe(prompt)
        v.request_generation_tokens.observe(completion)
        self._observe_usage_extras(usage)

    def _observe_usage_extras(self, usage: dict[str, Any]) -> None:
        """specrelay's fields of a finished request's usage: speculation, relay, PTE."""
        m, v = self, self.vllm
        for counters, key in (((m.spec_steps, v.spec_drafts), "spec_steps"),
                              ((m.drafted, v.spec_draft_tokens), "drafted_tokens"),
                              ((m.accepted, v.spec_accepted_tokens), "accepted_tokens")):
            if isinstance(usage.get(key), (int, float)):
                for counter in counters:
                    counter.inc(usage[key])
        relay = usage.get("relay") or {}
        for counter, key in ((m.relay_span, "span_tokens"), (m.relay_reused, "reused_tokens"),
                             (m.relay_recomputed, "recomputed_tokens")):
            counter.inc(relay.get(key, 0))
        pte = usage.get("pte") or {}
        for part in ("total", "prefill", "decode", "recompute"):
            if part in pte:
                m.pte.inc(pte[part], part=part)

    def observe_failure(self, finish: Finish | None, why: str) -> None:
        """A request that ended without a response: `finish` (the generation's, if it got that far) or `why`."""
        self.finished.inc(reason=finish.reason if finish is not None else why)
        self.vllm.finished("abort")

    def value(self, name: str, **labels: str) -> float:
        """A sample's current value (0 when it has none yet), by its exposed name."""
        return self.registry.get_sample_value(name, labels) or 0.0

    def render(self) -> bytes:
        drafted, accepted = self.value("specrelay_spec_drafted_tokens_total"), self.value(
            "specrelay_spec_accepted_tokens_total")
        if accepted or drafted:
            self.acceptance.set(accepted / max(drafted, 1.0))
        if prompt := self.value("specrelay_prompt_tokens_total"):
            self.reuse.set(self.value("specrelay_prompt_tokens_cached_total") / prompt)
        if self.kv_stats is not None:
            stats = self.kv_stats()
            self.kv_used.set(stats.blocks_used)
            self.kv_total.set(stats.blocks_total)
            self.kv_kept.set(stats.blocks_kept)
            self.vllm.kv_usage.set(stats.blocks_used / stats.blocks_total if stats.blocks_total else 0.0)
        return prom.generate_latest(self.registry)


class VllmMetrics:
    """vLLM's series (see the module docstring), each already bound to this server's `model_name`."""

    def __init__(self, r: prom.CollectorRegistry, model_name: str, with_kv: bool):
        label = ("model_name",)

        def bound(metric):
            return metric.labels(model_name=model_name)

        self.running = bound(prom.Gauge("vllm:num_requests_running", "Requests admitted and generating", label,
                                        registry=r))
        self.waiting = bound(prom.Gauge("vllm:num_requests_waiting", "Requests waiting for admission", label,
                                        registry=r))
        self.ttft = bound(prom.Histogram("vllm:time_to_first_token_seconds", "Time to first token", label,
                                         buckets=TTFT_BUCKETS_S, registry=r))
        self.itl = bound(prom.Histogram("vllm:inter_token_latency_seconds", "Time between output tokens, per token",
                                        label, buckets=TPOT_BUCKETS_S, registry=r))
        self.tpot = bound(prom.Histogram("vllm:request_time_per_output_token_seconds",
                                         "Time per output token after the first, per request", label,
                                         buckets=TPOT_BUCKETS_S, registry=r))
        self.e2e = bound(prom.Histogram("vllm:e2e_request_latency_seconds", "Arrival to the last token", label,
                                        buckets=E2E_BUCKETS_S, registry=r))
        self.prompt_tokens = bound(prom.Counter("vllm:prompt_tokens", "Prefill tokens processed", label,
                                                registry=r))
        self.generation_tokens = bound(prom.Counter("vllm:generation_tokens", "Generation tokens processed", label,
                                                    registry=r))
        self.request_prompt_tokens = bound(prom.Histogram("vllm:request_prompt_tokens", "Prompt tokens per request",
                                                          label, buckets=TOKEN_BUCKETS, registry=r))
        self.request_generation_tokens = bound(prom.Histogram("vllm:request_generation_tokens",
                                                              "Generated tokens per request", label,
                                                              buckets=TOKEN_BUCKETS, registry=r))
        self.prefix_queries = bound(prom.Counter("vllm:prefix_cache_queries", "Prompt tokens looked up in the "
                                                 "prefix cache", label, registry=r))
        self.prefix_hits = bound(prom.Counter("vllm:prefix_cache_hits", "Prompt tokens whose KV was reused", label,
                                              registry=r))
        self.spec_drafts = bound(prom.Counter("vllm:spec_decode_num_drafts", "Verify steps over a draft", label,
                                              registry=r))
        self.spec_draft_tokens = bound(prom.Counter("vllm:spec_decode_num_draft_tokens", "Draft tokens verified",
                                                    label, registry=r))
        self.spec_accepted_tokens = bound(prom.Counter("vllm:spec_decode_num_accepted_tokens",
                                                       "Draft tokens the target accepted", label, registry=r))
        self.preemptions = bound(prom.Counter("vllm:num_preemptions", "Running requests paused by the SLO schedule",
                                              label, registry=r))
        self.success = prom.Counter("vllm:request_success", "Finished requests, by finish reason",
                                    ("model_name", "finished_reason"), registry=r)
        self._model_name = model_name
        if with_kv:
            self.kv_usage = bound(prom.Gauge("vllm:kv_cache_usage_perc", "KV cache usage, 1 = full", label,
                                             registry=r))

    def finished(self, reason: str) -> None:
        """Count a finished request under vLLM's finished_reason (stop | length | abort)."""
        vllm_reason = "stop" if reason in ("stop", "tool_calls") else "length" if reason == "length" else "abort"
        self.success.labels(model_name=self._model_name, finished_reason=vllm_reason).inc()


class InterTokenLatency:
    """vLLM's per-token inter-token latency for one generation: a chunk of k tokens g seconds after the previous
    one is k observations of g / k. The first chunk's tokens are in TTFT, not here."""

    def __init__(self, histogram, clock: Callable[[], float] = time.monotonic):
        self.histogram, self.clock = histogram, clock
        self.num_tokens = 0
        self.last_s: float | None = None

    def arrived(self, num_tokens: int) -> None:
        """`num_tokens`: the generation's tokens so far, now that a chunk of them arrived."""
        now, new = self.clock(), num_tokens - self.num_tokens
        if new <= 0:
            return
        if self.last_s is not None:
            for _ in range(new):
                self.histogram.observe((now - self.last_s) / new)
        self.num_tokens, self.last_s = num_tokens, now


def parse_samples(text: str) -> dict[str, float]:
    """`name{label="value",...}` -> value for every sample of an exposition, read by Prometheus' own parser (what a
    scraper sees); labels sorted by name."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[s.name + (f"{{{labels}}}" if labels else "")] = s.value
    return out
