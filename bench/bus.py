"""`specrelay bench bus`: what the bus costs per speculative step, local queues and Redis Streams against the
in-process engine, on the same prompts, in one run.

Each transport runs the verifier and drafter services (and a client in place of the gateway) on one event loop;
per-step overhead = (wall time over the bus − wall time in process) / verify steps. Over the bus, requests join the batch as they arrive, so step counts can differ a little from the
in-process run. Greedy outputs are compared too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from specrelay.models.resolve import DEFAULT_MODEL

    parser.add_argument("--model", default=DEFAULT_MODEL, help="a model directory, a .gguf file or a built-in model "
                        f"(default: {DEFAULT_MODEL}; the small pair: models/target)")
    parser.add_argument("--draft", default=None, help="a draft model (default: the pair's draft for the pair's "
                        "target)")
    parser.add_argument("--proposer", choices=("tree", "recycle", "suffix"), default=None,
                        help="default: tree where there is a draft model, else recycle (as specrelay serve)")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0", metavar="URL",
                        help="the Redis to measure (keys go under a fresh prefix, deleted afterwards)")
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None, metavar="FILE")


def prompts(model_dir: str, n: int) -> list[list[int]]:
    from specrelay.models.corpus import tool_prompts
    from specrelay.shared.tokenizer import Tokenizer

    tok = Tokenizer(model_dir)
    return [tok.apply_chat_template(p.messages, tools=p.tools) for p in tool_prompts(seed=11, num_prompts=n)]


def make_proposer(name: str, target, draft):
    """A fresh proposer of the kind `specrelay serve` would run for this target."""
    from specrelay.services.drafter.draft_model import DraftModelProposer
    from specrelay.services.drafter.recycling import TokenRecyclingProposer
    from specrelay.services.drafter.suffix import SuffixProposer
    from specrelay.shared.modeling.runner import ModelRunner

    if name == "tree":
        return DraftModelProposer(ModelRunner(draft, num_blocks=2048))
    return {"recycle": TokenRecyclingProposer, "suffix": SuffixProposer}[name](target.config.vocab_size)


def in_process(target, proposer, items, max_tokens) -> tuple[float, int, list[list[int]]]:
    from specrelay.services.verifier.engine import SpecEngine
    from specrelay.shared.modeling.runner import ModelRunner
    from specrelay.shared.sampling import SamplingParams

    engine = SpecEngine(ModelRunner(target, num_blocks=2048), proposer)
    params = SamplingParams(max_tokens=max_tokens)
    engine.generate(items[:1], params)  # warm-up
    t0 = time.perf_counter()
    reqs = engine.generate(items, params)
    return time.perf_counter() - t0, sum(r.stats.steps for r in reqs), [r.output for r in reqs]


async def over_bus(url, target, proposer, items, max_tokens) -> tuple[float, int, list[list[int]]]:
    from specrelay.services.drafter.service import Drafter, serve_drafter
    from specrelay.services.verifier.engine import SpecEngine
    from specrelay.services.verifier.service import VerifierConfig, VerifierService
    from specrelay.shared.bus import BusConfig, make_bus
    from specrelay.shared.messages import GENERATE_STREAM, Generate, SamplingSpec, TokenChunk
    from specrelay.shared.modeling.runner import ModelRunner

    prefix = f"specrelay-bench:{uuid.uuid4().hex[:8]}:"
    async with make_bus(url, BusConfig(prefix=prefix, block_ms=20)) as bus:
        engine = SpecEngine(ModelRunner(target, num_blocks=2048), None, max_nodes=16, speculate=True)
        service = VerifierService(VerifierConfig(model_dir="", max_nodes=16), bus, engine=engine)
        drafter = Drafter(proposer)
        tasks = [asyncio.create_task(service.run()), asyncio.create_task(serve_drafter(bus, drafter, "bench"))]
        channel = bus.open_reply_channel(TokenChunk)

        async def batch(ps, tag):
            for i, p in enumerate(ps):
                await bus.publish(GENERATE_STREAM, Generate(f"{tag}{i}", p, SamplingSpec(max_tokens=max_tokens),
                                                            channel.name))
            outs, usage, done = {}, {}, 0
            while done < len(ps):
                chunk = await asyncio.wait_for(channel.get(), 120)
                outs.setdefault(chunk.request_id, []).extend(chunk.token_ids)
                if chunk.finish_reason:
                    done += 1
                    usage[chunk.request_id] = chunk.usage
            return [outs[f"{tag}{i}"] for i in range(len(ps))], sum(u.spec_steps for u in usage.values())

        try:
            await batch(items[:1], "warm")
            t0 = time.perf_counter()
            outputs, steps = await batch(items, "r")
            elapsed = time.perf_counter() - t0
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if url:
            import redis.asyncio as redis

            client = redis.from_url(url)
            keys = [k async for k in client.scan_iter(match=prefix + "*")]
            if keys:
                await client.delete(*keys)
            await client.aclose()
    return elapsed, steps, outputs


def main(args: argparse.Namespace) -> int:
    import torch

    from specrelay.models.resolve import choose_proposer, resolve_model
    from specrelay.shared.modeling.loader import load_model

    model_dir = resolve_model(args.model)
    proposer, draft_dir = choose_proposer(model_dir, args.draft, args.proposer)
    args.model = str(model_dir)
    torch.set_num_threads(args.threads)
    target = load_model(args.model)
    draft = None if proposer != "tree" else load_model(draft_dir)
    items = prompts(args.model, args.num_prompts)
    base_s, base_steps, reference = in_process(target, make_proposer(proposer, target, draft), items, args.max_tokens)
    rows = {"in_process": {"wall_s": round(base_s, 3), "steps": base_steps, "overhead_ms_per_step": 0.0,
                           "identical_to_in_process": True}}
    for name, url in (("local", None), ("redis", args.redis)):
        wall, steps, outputs = asyncio.run(over_bus(url, target, make_proposer(proposer, target, draft), items,
                                                    args.max_tokens))
        rows[name] = {"wall_s": round(wall, 3), "steps": steps,
                      "overhead_ms_per_step": round(1000 * (wall - base_s) / max(steps, 1), 3),
                      "identical_to_in_process": outputs == reference}
    print(f"model {model_dir.name}, proposer {proposer}")
    print(f"{'transport':<12} {'wall s':>8} {'steps':>6} {'overhead ms/step':>17} identical")
    for name, r in rows.items():
        print(f"{name:<12} {r['wall_s']:>8.3f} {r['steps']:>6} {r['overhead_ms_per_step']:>17.3f} "
              f"{r['identical_to_in_process']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": model_dir.name, "proposer": proposer, "transports": rows,
                                               "num_prompts": args.num_prompts,
                                               "max_tokens": args.max_tokens}, indent=2))
    return 0
