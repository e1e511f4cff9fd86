"""`specrelay serve`: the gateway, the verifier and the drafter in one process, over one bus — the in-process
bus by default (the embedded default), or Redis with `--redis URL` (the same services, talking over Redis Streams).
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from specrelay.services.config import ServeConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from specrelay.services.drafter.service import add_draft_arguments
    from specrelay.services.gateway import service as gateway
    from specrelay.services.verifier import config as verifier

    gateway.add_arguments(parser)  # --model, --host, --port, --redis, --api-key, ...
    add_draft_arguments(parser, plain_decoding=True)  # --draft, --proposer (as `specrelay drafter`, or none)
    verifier.add_arguments(parser)  # --max-nodes, --num-blocks, --device, --pte-profile, relay, ...


async def serve(config: ServeConfig) -> None:
    import asyncio

    from specrelay.services.drafter.service import Drafter, build_proposer, draft_grammars, serve_drafter
    from specrelay.services.gateway.app import create_app
    from specrelay.services.gateway.metrics import KvStats
    from specrelay.services.verifier.service import VerifierService
    from specrelay.shared.bus import make_bus
    from specrelay.shared.http import app_runner, listen
    from specrelay.shared.tokenizer import Tokenizer

    service, gateway_config = config.gateway, config.gateway.gateway
    async with make_bus(service.redis_url) as bus:
        verifier = VerifierService(config.verifier, bus)
        cache = verifier.engine.runner.cache
        kv_stats = lambda: KvStats(cache.allocator.num_blocks - cache.num_free_blocks,  # noqa: E731
                                   cache.allocator.num_blocks, blocks_kept=verifier.scheduler.num_kept_blocks())
        tasks = [asyncio.create_task(verifier.run())]
        if config.drafter is not None:
            drafter = Drafter(build_proposer(config.drafter), draft_grammars(config.drafter.model_dir))
            tasks.append(asyncio.create_task(serve_drafter(bus, drafter, "drafter-embedded")))
        server_tools = service.tools.build(bus) if service.tools is not None else None
        runner = app_runner(create_app(gateway_config, bus, Tokenizer(service.model_dir), kv_stats=kv_stats,
                                       server_tools=server_tools))
        await runner.setup()
        try:
            await listen(runner, service.host, service.port)
            proposer = config.drafter.proposer if config.drafter is not None else "none"
            print(f"specrelay serve: {gateway_config.model_name!r} (draft: {proposer}) on "
                  f"http://{service.host}:{service.port}/v1, bus: {service.redis_url or 'in-process'}, schedule: "
                  f"{gateway_config.policy} ({gateway_config.max_running} running)", flush=True)
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()  # a service that died takes the server down with its error
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await runner.cleanup()


def main(args: argparse.Namespace) -> int:
    import asyncio

    from specrelay.services.config import build_serve
    from specrelay.shared.stopping import serve_until_stopped

    config = build_serve(args)  # a bad value stops here, before anything starts
    try:
        asyncio.run(serve_until_stopped(serve(config)))
    except KeyboardInterrupt:
        pass
    return 0
