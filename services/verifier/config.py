"""The verifier's configuration: one frozen `VerifierConfig`, checked when it is built, and its command-line flags,
declared once here for both entrypoints that run a verifier (`specrelay verifier`, cli.py; `specrelay serve`,
services/serve.py), each of which builds its config from the parsed flags with `from_args` and nothing else.
"""

from __future__ import annotations

import argparse
import os
import socket
from dataclasses import dataclass, field

from specrelay.services.verifier.relay import RelayConfig
from specrelay.shared.errors import ConfigError
from specrelay.shared.redis_keys import DEFAULT_PREFIX


@dataclass(frozen=True)
class VerifierConfig:
    model_dir: str  # "" only with an engine handed to the service (tests, benchmarks)
    redis: str | None = None
    consumer: str = f"verifier-{socket.gethostname()}-{os.getpid()}"  # pid 1 in every container
    speculate: bool = True  # ask the drafter service for trees
    max_nodes: int = 16
    num_blocks: int = 2048
    block_size: int = 16
    max_batch: int = 32
    draft_timeout_s: float = 0.5
    device: str = "cpu"
    prefix_caching: bool = True  # reuse finished requests' KV for prompts that start with the same tokens
    kvstore: str | None = None  # None: a store in this process; redis://... or shm://NAME to share across replicas
    kvstore_capacity_bytes: int = 512 << 20
    kvstore_prefix: str = DEFAULT_PREFIX  # Redis key prefix of the store (shared/redis_keys.py)
    relay: RelayConfig = field(default_factory=RelayConfig)  # publish outputs' decode KV; reuse quoted ones
    report_kv: bool = True  # publish KvReports for gateways in other processes (serve shares the cache directly)
    pte_profile: str | None = None  # usage.pte's profile file; None: calibrated, else analytic (shared/pte_profiles.py)
    max_hold_s: float = 300.0  # the longest a finished request's KV is held for a Continue (held.py)
    client_retention: bool = True  # keep / offload / drop KV across client tool pauses (client_retention.py)
    kvstore_bytes_per_s: float = 2e9  # what that policy prices an offload and reload at (in-process store: ~2 GB/s)
    # A new replica reads the Cancels of this last while (a request it takes over may have been cancelled before it
    # started), not every Cancel the stream retains.
    cancel_replay_s: float = 60.0
    # A request left unrenewed this long by its replica (dead) is taken over by another (the bus's leases)
    claim_idle_s: float = 30.0
    # > 0: admissions are prefilled this many prompt tokens per step, beside the running requests' decode step
    # (chunked_prefill.py), so a long prompt does not stall the streams; 0: a prompt is prefilled whole, in a step
    # of its own
    prefill_chunk: int = 0

    def __post_init__(self) -> None:
        at_least_one = {"max_nodes": self.max_nodes, "num_blocks": self.num_blocks, "block_size": self.block_size,
                        "max_batch": self.max_batch, "kvstore_capacity_bytes": self.kvstore_capacity_bytes}
        positive = {"draft_timeout_s": self.draft_timeout_s, "kvstore_bytes_per_s": self.kvstore_bytes_per_s,
                    "claim_idle_s": self.claim_idle_s}
        not_negative = {"max_hold_s": self.max_hold_s, "cancel_replay_s": self.cancel_replay_s,
                        "prefill_chunk": self.prefill_chunk}
        bad = ([f"{k}={v!r} must be a whole number ≥ 1" for k, v in at_least_one.items()
                if isinstance(v, bool) or not isinstance(v, int) or v < 1]
               + [f"{k}={v!r} must be positive" for k, v in positive.items() if not v > 0]
               + [f"{k}={v!r} must not be negative" for k, v in not_negative.items() if not v >= 0])
        if not self.consumer:
            bad.append("consumer must name this replica")
        if bad:
            raise ConfigError("verifier config: " + "; ".join(bad))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of a verifier in any process: `specrelay serve` and `specrelay verifier` both take these."""
    from specrelay.shared.flags import add_device_argument

    parser.add_argument("--max-nodes", type=int, default=16, help="largest draft tree verified per request")
    parser.add_argument("--num-blocks", type=int, default=2048, help="KV cache blocks (16 tokens each)")
    add_device_argument(parser)
    parser.add_argument("--prefill-chunk", type=int, default=0, metavar="TOKENS",
                        help="prefill new prompts this many tokens per step beside the running streams' decode "
                             "(chunked prefill: a long prompt does not stall them); 0 (default): whole prompts")
    parser.add_argument("--pte-profile", default=None, metavar="FILE",
                        help="PTE profile for usage.pte (default: what `specrelay calibrate` cached, else analytic)")
    parser.add_argument("--no-client-retention", action="store_true",
                        help="at a client tool pause, publish and free the turn's KV as before, instead of "
                             "letting the retention policy keep, offload or drop it")
    from specrelay.services.verifier.relay_hooks import add_relay_options

    add_relay_options(parser)


def from_args(args: argparse.Namespace, model_dir: str, **settings) -> VerifierConfig:
    """The config from `add_arguments`' flags; `settings`: what the entrypoint decides itself (its own flags, or
    what it knows of the deployment). Raises ConfigError on a bad value."""
    from specrelay.services.verifier.relay_hooks import relay_config

    return VerifierConfig(model_dir, max_nodes=args.max_nodes, num_blocks=args.num_blocks, device=args.device,
                          prefill_chunk=getattr(args, "prefill_chunk", 0),
                          pte_profile=args.pte_profile, client_retention=not args.no_client_retention,
                          relay=relay_config(args), **settings)
