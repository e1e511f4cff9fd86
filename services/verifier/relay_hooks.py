"""What a verifier calls to take part in relays: settings, admit (find quotes, relay-prefill), publish on finish,
and the counters behind usage and /metrics.

    config = relay_config(args)                     # from --relay-* options (add_relay_options)
    prefill = await relay_admit(runner, store, model_id, table, prompt, config)
    if prefill is None: ... prefill as usual ...    # nothing quoted, or relay off
    ...
    await publish_output(runner, store, model_id, table, prompt_len=len(prompt), output=output)

`VerifierRelay` bundles the two for the verifier service (service.py): `admit` relays all of the prompt but its last
token, which the engine prefills as usual for the first output token's logits, and returns the `RelayUsage` that
goes into the request's usage; `publish` runs when a turn finishes, before its KV is freed or held.

`model_id` must name everything that changes the K/V of the same tokens (weights revision, KV dtype), as for the
prefix cache.
"""

from __future__ import annotations

import argparse
import asyncio
from dataclasses import dataclass

from specrelay.services.kvstore import KVStore
from specrelay.services.verifier.relay import RELAY_METHODS, RelayConfig, RelayPrefill, capture_span, relay_prefill
from specrelay.services.verifier.relay_index import lookup_relay, publish_span
from specrelay.shared.errors import ConfigError
from specrelay.shared.messages import RelayUsage
from specrelay.shared.modeling.kv_cache import BlockTable
from specrelay.shared.modeling.runner import ModelRunner


@dataclass
class RelayCounters:
    """Cumulative, for /metrics (Prometheus counters); per request the same numbers go into usage."""

    requests_relayed: int = 0  # prefills that reused at least one span
    span_tokens: int = 0  # prompt tokens covered by relayed spans
    reused_tokens: int = 0  # ... whose K/V was kept
    recomputed_tokens: int = 0  # ... recomputed by the selection rule
    spans_published: int = 0
    tokens_published: int = 0

    def add(self, prefill: RelayPrefill) -> None:
        self.requests_relayed += 1
        self.span_tokens += prefill.num_span_tokens
        self.reused_tokens += prefill.num_reused_tokens
        self.recomputed_tokens += prefill.num_recomputed_tokens

    def prometheus(self, prefix: str = "specrelay_relay_") -> str:
        import prometheus_client as prom

        registry = prom.CollectorRegistry()
        for name, value in vars(self).items():
            prom.Counter(f"{prefix}{name}", name.replace("_", " "), registry=registry).inc(value)
        return prom.generate_latest(registry).decode()


async def relay_admit(runner: ModelRunner, store: KVStore, model_id: str, table: BlockTable, prompt: list[int],
                      config: RelayConfig, counters: RelayCounters | None = None,
                      logits_rows: list[int] | None = None) -> RelayPrefill | None:
    """Prefill the part of `prompt` after `table.num_tokens` (a prefix hit may have filled the start) reusing the
    spans the store knows; None, with nothing written, when relay is off or nothing is quoted."""
    if not config.enabled:
        return None
    new_tokens = prompt[table.num_tokens:]
    placed = await lookup_relay(store, model_id, new_tokens, runner.model.inv_freq, config.min_span_tokens,
                                device=runner.model.device)
    if not placed:
        return None
    prefill = await asyncio.to_thread(relay_prefill, runner.model, runner.cache, table, new_tokens, placed, config,
                                      logits_rows)
    if counters is not None:
        counters.add(prefill)
    return prefill


async def publish_output(runner: ModelRunner, store: KVStore, model_id: str, table: BlockTable, prompt_len: int,
                         output: list[int], counters: RelayCounters | None = None, min_tokens: int = 16) -> int:
    """Publish the decode-phase K/V of a finished request's output: the output tokens whose K/V the table holds
    (the last sampled token usually has none yet). Returns the number of tokens published."""
    num_tokens = min(len(output), table.num_tokens - prompt_len)
    if num_tokens < min_tokens:
        return 0
    span = capture_span(runner.cache, table, prompt_len, prompt_len + num_tokens, output[:num_tokens],
                        runner.model.inv_freq)
    if not await publish_span(store, model_id, span):
        return 0
    if counters is not None:
        counters.spans_published += 1
        counters.tokens_published += num_tokens
    return num_tokens


class VerifierRelay:
    """A verifier's relay: one store, one model id, one config; what the service calls at admit and at finish."""

    def __init__(self, runner: ModelRunner, store: KVStore, model_id: str, config: RelayConfig):
        if config.check_layers is None:  # the band measured for this model, once (`bench relay --layer-profile`)
            from dataclasses import replace

            from specrelay.services.verifier.relay_profile import band_for

            check, head = band_for(model_id)
            config = replace(config, check_layers=check, recompute_first=max(config.recompute_first, head))
        self.runner, self.store, self.model_id, self.config = runner, store, model_id, config
        self.counters = RelayCounters()

    async def admit(self, table: BlockTable, prompt: list[int]) -> RelayUsage | None:
        """Relay-prefill the prompt after what `table` holds, but for its last token: the engine computes that one
        as usual (attending to everything here), and its logits give the first output token. None: nothing
        quoted, nothing written."""
        if len(prompt) - table.num_tokens < 2:
            return None
        prefill = await relay_admit(self.runner, self.store, self.model_id, table, prompt[:-1], self.config,
                                    self.counters, logits_rows=[])
        if prefill is None:
            return None
        return RelayUsage(prefill.num_span_tokens, prefill.num_reused_tokens, prefill.num_recomputed_tokens)

    async def publish(self, table: BlockTable, prompt_len: int, output: list[int]) -> int:
        """On finish, before the KV is freed: the output's decode-phase K/V, for later agents quoting it."""
        if not self.config.enabled:
            return 0
        return await publish_output(self.runner, self.store, self.model_id, table, prompt_len, output, self.counters,
                                    self.config.min_span_tokens)


def add_relay_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("relay (reuse of upstream agents' decode-phase KV)")
    group.add_argument("--relay", action=argparse.BooleanOptionalAction, default=False,
                       help="reuse quoted outputs' K/V (off by default: exact prefix reuse only; on the real model "
                            "relay changes answers, README RelayCaching)")
    group.add_argument("--relay-method", choices=RELAY_METHODS, default="relaycaching")
    group.add_argument("--relay-recompute-ratio", type=float, default=0.15,
                       help="cacheblend, and relaycaching with --relay-select top: share recomputed (default 0.15)")
    group.add_argument("--relay-deviation-factor", type=float, default=2.0,
                       help="relaycaching: deviation ≥ α·mean (default 2.0; the paper's 1.5)")
    group.add_argument("--relay-influence-factor", type=float, default=2.5,
                       help="relaycaching: influence ≥ β·mean (default 2.5; the paper's 1.45)")
    group.add_argument("--relay-influence-from", choices=("prompt", "span"), default="prompt",
                       help="relaycaching: influence is attention from the prompt's last tokens, or each span's")
    group.add_argument("--relay-influence-layers", choices=("check", "all"), default="check",
                       help="relaycaching: influence at the check layers, or summed over all layers (a probe pass: "
                            "lower KL, slower)")
    group.add_argument("--relay-select", choices=("threshold", "top"), default="threshold",
                       help="relaycaching: recompute influence ≥ β·mean, or the top --relay-recompute-ratio share "
                            "by influence (either way ∪ deviation ≥ α·mean)")
    group.add_argument("--relay-check-layers", default="auto",
                       help="comma-separated layer indices, or auto (default): the band `specrelay bench relay "
                            "--layer-profile` measured and cached for the model, else layer 1")
    group.add_argument("--relay-recompute-first", type=int, default=0,
                       help="recompute the first N tokens of every quoted span in every layer (EPIC; default 0)")
    group.add_argument("--relay-min-tokens", type=int, default=16, help="shortest quote reused (default 16)")


def relay_config(args: argparse.Namespace) -> RelayConfig:
    try:
        check = (None if args.relay_check_layers.strip() == "auto"
                 else tuple(int(x) for x in args.relay_check_layers.split(",") if x.strip()))
    except ValueError:
        raise ConfigError(f"--relay-check-layers: expected comma-separated integers, got "
                          f"{args.relay_check_layers!r}") from None
    return RelayConfig(enabled=args.relay, method=args.relay_method, recompute_ratio=args.relay_recompute_ratio,
                       deviation_factor=args.relay_deviation_factor, influence_factor=args.relay_influence_factor,
                       influence_from=args.relay_influence_from, influence_layers=args.relay_influence_layers,
                       select=args.relay_select,
                       check_layers=check, recompute_first=args.relay_recompute_first,
                       min_span_tokens=args.relay_min_tokens)
