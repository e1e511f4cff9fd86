"""`specrelay verifier`: one verifier replica (service.py) over Redis, beside gateways and drafters elsewhere. Stopped
(Ctrl-C or SIGTERM), it gives back what it holds before the bus closes (VerifierService.close)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from specrelay.services.verifier.config import VerifierConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from specrelay.models.resolve import add_model_argument
    from specrelay.shared.flags import add_redis_argument

    add_model_argument(parser)
    add_redis_argument(parser)
    parser.add_argument("--no-speculate", action="store_true", help="plain decoding, no drafter service")
    parser.add_argument("--claim-idle-s", type=float, default=os.environ.get("SPECRELAY_CLAIM_IDLE_S", "30"),
                        metavar="S", help="a request left unrenewed this long by its replica (dead) is taken over by "
                                          "another; a live replica renews its claims every S/3 (give every replica "
                                          "the same value; or SPECRELAY_CLAIM_IDLE_S)")
    parser.add_argument("--cancel-replay-s", type=float, default=60.0, metavar="S",
                        help="a starting replica reads the Cancels of the last S seconds, not the whole stream")
    parser.add_argument("--kvstore", default=os.environ.get("SPECRELAY_KVSTORE"), metavar="URL",
                        help="where prefix KV is shared: redis://... or shm://NAME (default: in this process)")
    parser.add_argument("--kv-capacity", default=os.environ.get("SPECRELAY_KV_CAPACITY", "512M"), metavar="SIZE",
                        help="bytes the prefix KV store may hold (e.g. 2G); the same value for every process "
                             "sharing one store")
    from specrelay.services.verifier import config

    config.add_arguments(parser)  # --max-nodes, --num-blocks, --device, ... (as `specrelay serve`)


def build_config(args: argparse.Namespace) -> VerifierConfig:
    """`specrelay verifier`'s config: one replica over Redis. Raises ConfigError on a bad value."""
    from specrelay.models.resolve import resolve_model
    from specrelay.services.kvstore.service import parse_bytes
    from specrelay.services.verifier.config import from_args
    from specrelay.shared.errors import ConfigError

    if not args.redis:
        raise ConfigError("a stand-alone verifier needs --redis URL (or SPECRELAY_REDIS)")
    model_dir = str(resolve_model(args.model))  # a .gguf or built-in model: imported once into the cache
    return from_args(args, model_dir, redis=args.redis, speculate=not args.no_speculate, kvstore=args.kvstore,
                     kvstore_capacity_bytes=parse_bytes(args.kv_capacity), cancel_replay_s=args.cancel_replay_s,
                     claim_idle_s=args.claim_idle_s)


def main(args: argparse.Namespace) -> int:
    from specrelay.services.verifier.service import VerifierService
    from specrelay.shared.bus import BusConfig, make_bus
    from specrelay.shared.stopping import serve_until_stopped

    cfg = build_config(args)
    logging.basicConfig(level=logging.INFO)

    async def go() -> None:
        async with make_bus(cfg.redis, BusConfig(min_idle_ms=int(cfg.claim_idle_s * 1000))) as bus:
            # run() cancelled (Ctrl-C, SIGTERM), then close() gives back what it holds, before the bus closes
            await serve_until_stopped(VerifierService(cfg, bus).run())

    asyncio.run(go())
    return 0
