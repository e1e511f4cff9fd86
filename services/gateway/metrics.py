"""Prometheus metrics of the gateway, in the text exposition format (version 0.0.4), written by hand.

Plain Python and tiny on purpose: counters, gauges and histograms with labels are all the gateway needs, and a
dependency would not make `/metrics` more correct. Gauges the gateway does not own (KV blocks of an in-process
verifier) come from a `KvStatsSource` callable read at scrape time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Latency buckets in seconds: TTFT spans queueing + prefill, TPOT one decode step of a small model to a large one.
TTFT_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TPOT_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)
E2E_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _num(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class _Metric:
    type = ""

    def __init__(self, name: str, help: str, labels: tuple[str, ...] = ()):
        self.name, self.help, self.label_names = name, help, labels

    def _key(self, labels: dict[str, str]) -> tuple[str, ...]:
        if set(labels) != set(self.label_names):
            raise ValueError(f"{self.name}: labels {sorted(labels)} != {sorted(self.label_names)}")
        return tuple(str(labels[n]) for n in self.label_names)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.type}"]


class Counter(_Metric):
    type = "counter"

    def __init__(self, name: str, help: str, labels: tuple[str, ...] = ()):
        super().__init__(name, help, labels)
        self.values: dict[tuple[str, ...], float] = {} if labels else {(): 0.0}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        if amount < 0:
            raise ValueError(f"{self.name}: a counter only goes up")
        key = self._key(labels)
        self.values[key] = self.values.get(key, 0.0) + amount

    def get(self, **labels: str) -> float:
        return self.values.get(self._key(labels), 0.0)

    def render(self) -> list[str]:
        return self.header() + [f"{self.name}{_labels(self.label_names, k)} {_num(v)}"
                                for k, v in sorted(self.values.items())]


class Gauge(Counter):
    type = "gauge"

    def set(self, value: float, **labels: str) -> None:
        self.values[self._key(labels)] = float(value)

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = self._key(labels)
        self.values[key] = self.values.get(key, 0.0) + amount

    def dec(self, amount: float = 1.0, **labels: str) -> None:
        self.inc(-amount, **labels)


class Histogram(_Metric):
    type = "histogram"

    def __init__(self, name: str, help: str, buckets: Iterable[float], labels: tuple[str, ...] = ()):
        super().__init__(name, help, labels)
        self.bounds = tuple(sorted(buckets)) + (math.inf,)
        self.series: dict[tuple[str, ...], tuple[list[int], list[float]]] = {}  # key -> (bucket counts, [sum])

    def observe(self, value: float, **labels: str) -> None:
        counts, total = self.series.setdefault(self._key(labels), ([0] * len(self.bounds), [0.0]))
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                counts[i] += 1
                break
        total[0] += value

    def count(self, **labels: str) -> int:
        series = self.series.get(self._key(labels))
        return sum(series[0]) if series else 0

    def render(self) -> list[str]:
        lines = self.header()
        for key, (counts, total) in sorted(self.series.items()):
            cumulative = 0
            for bound, n in zip(self.bounds, counts):
                cumulative += n
                le = 'le="' + _num(bound) + '"'
                lines.append(f"{self.name}_bucket{_labels(self.label_names, key, le)} {cumulative}")
            lines.append(f"{self.name}_sum{_labels(self.label_names, key)} {_num(total[0])}")
            lines.append(f"{self.name}_count{_labels(self.label_names, key)} {cumulative}")
        return lines


@dataclass(frozen=True)
class KvStats:
    blocks_used: int
    blocks_total: int
    blocks_kept: int = 0  # of blocks_used: conversations held across a tool pause, not running requests


KvStatsSource = Callable[[], KvStats]


class GatewayMetrics:
    def __init__(self, kv_stats: KvStatsSource | None = None):
        self.kv_stats = kv_stats
        self.requests = Counter("specrelay_requests_total", "HTTP requests answered, by endpoint and status",
                                ("endpoint", "status"))
        self.finished = Counter("specrelay_request_finish_total", "Generations finished, by finish reason",
                                ("reason",))
        self.ttft = Histogram("specrelay_ttft_seconds", "Arrival to the first token from the verifier",
                              TTFT_BUCKETS_S)
        self.tpot = Histogram("specrelay_tpot_seconds", "Time per output token after the first, per request",
                              TPOT_BUCKETS_S)
        self.e2e = Histogram("specrelay_e2e_seconds", "Arrival to the last token", E2E_BUCKETS_S)
        self.prompt_tokens = Counter("specrelay_prompt_tokens_total", "Prompt tokens of finished generations")
        self.cached_tokens = Counter("specrelay_prompt_tokens_cached_total",
                                     "Prompt tokens whose KV was reused, not prefilled")
        self.completion_tokens = Counter("specrelay_completion_tokens_total", "Generated tokens billed")
        self.spec_steps = Counter("specrelay_spec_steps_total", "Verify forwards")
        self.drafted = Counter("specrelay_spec_drafted_tokens_total", "Draft tokens verified")
        self.accepted = Counter("specrelay_spec_accepted_tokens_total", "Draft tokens the target accepted")
        self.relay_span = Counter("specrelay_relay_span_tokens_total",
                                  "Prompt tokens covered by relayed spans (RelayCaching)")
        self.relay_reused = Counter("specrelay_relay_reused_tokens_total", "Relayed tokens whose K/V was reused")
        self.relay_recomputed = Counter("specrelay_relay_recomputed_tokens_total",
                                        "Relayed tokens selected for recomputation")
        self.pte = Counter("specrelay_pte_total", "Prefill token equivalents of finished generations, by part",
                           ("part",))
        self.tool_rounds = Counter("specrelay_tool_rounds_total",
                                   "Server-side tool rounds: the turn's tools ran and the model went on")
        self.server_tool_calls = Counter("specrelay_server_tool_calls_total",
                                         "Server-side tool calls run, by tool and outcome (ok | error)",
                                         ("tool", "outcome"))  # tool: a name of the server's registry
        self.tool_call_errors = Counter("specrelay_tool_call_errors_total",
                                        "Malformed tool calls, reported in message.tool_call_errors")
        self.tool_fallbacks = Counter("specrelay_tool_fallbacks_total",
                                      "Tool rounds sent as a fresh Generate of the whole conversation, by reason "
                                      "(continue_error | continue_timeout | not_held)", ("reason",))
        self.acceptance = Gauge("specrelay_spec_acceptance_rate", "Accepted / drafted tokens since start")
        self.reuse = Gauge("specrelay_kv_reuse_rate", "Cached / prompt tokens since start")
        self.running = Gauge("specrelay_requests_running", "Requests admitted and generating")
        self.queued = Gauge("specrelay_queue_depth", "Requests waiting for admission in the gateway")
        self.verifier_queue = Gauge("specrelay_verifier_queue_depth",
                                    "Generates waiting for or being served by the verifiers (sampled)")
        self.rejected = Counter("specrelay_admission_rejected_total", "Requests refused with 503 (queue full)")
        self.kv_used = Gauge("specrelay_kv_blocks_used", "KV cache blocks in use (in-process verifier)")
        self.kv_total = Gauge("specrelay_kv_blocks_total", "KV cache blocks in all (in-process verifier)")
        self.kv_kept = Gauge("specrelay_kv_blocks_kept",
                             "Of the blocks used, those of conversations held across a tool pause")

    def _all(self) -> list[_Metric]:
        return [v for v in vars(self).values() if isinstance(v, _Metric)]

    def render(self) -> str:
        if self.accepted.get() or self.drafted.get():
            self.acceptance.set(self.accepted.get() / max(self.drafted.get(), 1.0))
        if self.prompt_tokens.get():
            self.reuse.set(self.cached_tokens.get() / self.prompt_tokens.get())
        metrics = self._all()
        if self.kv_stats is not None:
            stats = self.kv_stats()
            self.kv_used.set(stats.blocks_used)
            self.kv_total.set(stats.blocks_total)
            self.kv_kept.set(stats.blocks_kept)
        else:
            metrics = [m for m in metrics if m not in (self.kv_used, self.kv_total, self.kv_kept)]
        return "\n".join(line for m in metrics for line in m.render()) + "\n"
