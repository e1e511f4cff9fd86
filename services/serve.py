"""`specrelay serve`: the gateway, the verifier and the drafter in one process, over one bus — the in-process
bus by default (the embedded default), or Redis with `--redis URL` (the same services, talking over Redis Streams).
"""

from __future__ import annotations

import argparse

PROPOSERS = ("tree", "chain", "recycle", "suffix", "none")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from specrelay.services.gateway import service as gateway

    gateway.add_arguments(parser)  # --model, --host, --port, --redis, --api-key, ...
    parser.add_argument("--draft", default=None, help="draft model: a directory or a .gguf file with the target's "
                        "vocabulary (default: the small pair's draft when --model is its target, else none)")
    parser.add_argument("--proposer", choices=PROPOSERS, default=None,
                        help="draft-model tree, chain, model-free Token Recycling, or none (plain decoding); default: "
                             "tree when there is a draft model, else recycle")
    from specrelay.services.verifier import config as verifier

    verifier.add_arguments(parser)  # --max-nodes, --num-blocks, --device, --pte-profile, relay, ...


async def serve(args: argparse.Namespace) -> None:
    import asyncio

    from specrelay.models.resolve import choose_proposer
    from specrelay.services.drafter.service import Drafter, DrafterConfig, build_proposer, draft_grammars, serve_drafter
    from specrelay.services.gateway import service as gateway
    from specrelay.services.gateway.app import create_app
    from specrelay.services.gateway.metrics import KvStats
    from specrelay.services.verifier.config import from_args
    from specrelay.services.verifier.service import VerifierService
    from specrelay.shared.bus import make_bus
    from specrelay.shared.http import app_runner, listen
    from specrelay.shared.tokenizer import Tokenizer

    config = gateway.build_config(args)
    model_dir = str(config.model_dir)  # a .gguf or built-in --model, imported once into the cache
    proposer, draft_dir = choose_proposer(config.model_dir, args.draft, args.proposer)
    speculate = proposer != "none"
    async with make_bus(args.redis) as bus:
        verifier = VerifierService(from_args(args, model_dir, redis=args.redis, speculate=speculate, report_kv=False,
                                             max_hold_s=max(300.0, args.tool_hold_s)), bus)
        cache = verifier.engine.runner.cache
        kv_stats = lambda: KvStats(cache.allocator.num_blocks - cache.num_free_blocks,  # noqa: E731
                                   cache.allocator.num_blocks, blocks_kept=verifier.scheduler.num_kept_blocks())
        gateway_config = config.gateway
        if gateway_config.max_model_len > verifier.engine.runner.max_model_len:
            from dataclasses import replace

            gateway_config = replace(gateway_config, max_model_len=verifier.engine.runner.max_model_len)
        if gateway_config.max_running > verifier.cfg.max_batch:
            from dataclasses import replace

            # Requests beyond the verifier's batch would wait in its FIFO, out of the schedule's reach: with no more
            # running than fit in one batch, the gateway's admission order is the batch composition.
            gateway_config = replace(gateway_config, max_running=verifier.cfg.max_batch)
        tasks = [asyncio.create_task(verifier.run())]
        if speculate:
            draft = draft_dir and str(draft_dir)
            drafter = Drafter(build_proposer(DrafterConfig(model_dir, draft, proposer, device=args.device)),
                              draft_grammars(str(model_dir)))
            tasks.append(asyncio.create_task(serve_drafter(bus, drafter, "drafter-embedded")))
        server_tools = config.tools.build(bus) if config.tools is not None else None
        runner = app_runner(create_app(gateway_config, bus, Tokenizer(model_dir), kv_stats=kv_stats,
                                       server_tools=server_tools))
        await runner.setup()
        try:
            await listen(runner, args.host, args.port)
            print(f"specrelay serve: {gateway_config.model_name!r} (draft: {proposer}) on "
                  f"http://{args.host}:{args.port}/v1, bus: {args.redis or 'in-process'}, schedule: "
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

    from specrelay.shared.stopping import serve_until_stopped

    try:
        asyncio.run(serve_until_stopped(serve(args)))
    except KeyboardInterrupt:
        pass
    return 0
