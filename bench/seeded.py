"""`specrelay bench seeded`: what a fixed `seed` costs speculation. The same sampled workload three ways on one
engine set-up, side by side: unseeded (speculative sampling's rejection rule: a draft token is accepted with
probability min(1, p/q)), seeded (positional draws, shared/seeded_draws.py: accepted only when it equals the
target's own draw) and greedy (for scale). Prints accepted draft tokens per verify step and tokens/s."""

from __future__ import annotations

import argparse
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="models/target", help="a model directory (default: the small pair)")
    parser.add_argument("--draft", default=None, help="its draft model (default: the pair's draft)")
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--max-nodes", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")


def run(target, draft, prompts, params_of, batch: int, max_nodes: int) -> tuple[float, float]:
    """(accepted draft tokens per verify step, tokens/s) of the tree drafter over the prompts."""
    from specrelay.services.drafter.draft_model import DraftModelProposer
    from specrelay.services.verifier.engine import SpecEngine
    from specrelay.shared.modeling.runner import ModelRunner

    engine = SpecEngine(ModelRunner(target, num_blocks=2048), DraftModelProposer(ModelRunner(draft, num_blocks=2048)),
                        max_nodes=max_nodes, positional_seeds=True)  # as the verifier service runs it
    engine.generate(prompts[:batch], params_of(-1))  # warm-up: the budget's cost curve starts from measurements
    steps = accepted = tokens = 0
    t0 = time.perf_counter()
    for start in range(0, len(prompts), batch):
        chunk = prompts[start : start + batch]
        done = engine.add(chunk, [params_of(start + i) for i in range(len(chunk))])
        while engine.running:
            engine.step()
        steps += sum(r.stats.steps for r in done)
        accepted += sum(r.stats.accepted_tokens for r in done)
        tokens += sum(len(r.output) for r in done)
    return accepted / max(steps, 1), tokens / (time.perf_counter() - t0)


def main(args: argparse.Namespace) -> int:
    import torch

    from specrelay.bench.spec import stop_ids, workloads
    from specrelay.models.resolve import pair_draft, resolve_model
    from specrelay.shared.errors import ConfigError
    from specrelay.shared.modeling.loader import load_model
    from specrelay.shared.sampling import SamplingParams

    model_dir = resolve_model(args.model)
    draft_dir = resolve_model(args.draft, "--draft") if args.draft else pair_draft(model_dir)
    if draft_dir is None:
        raise ConfigError(f"{model_dir.name} has no paired draft model: pass --draft")
    torch.set_num_threads(args.threads)
    target, draft = load_model(str(model_dir)), load_model(str(draft_dir))
    prompts = workloads(str(model_dir), args.num_prompts)["chat"]
    base = dict(max_tokens=args.max_tokens, stop_token_ids=stop_ids(str(model_dir)))
    modes = {
        "unseeded": lambda i: SamplingParams(temperature=args.temperature, **base),
        "seeded": lambda i: SamplingParams(temperature=args.temperature, seed=1000 + i, **base),
        "greedy": lambda i: SamplingParams(**base),
    }
    print(f"{model_dir.name} + {draft_dir.name}, tree drafter, max_nodes {args.max_nodes}, temperature "
          f"{args.temperature}, {args.num_prompts} chat prompts x {args.max_tokens} tokens, batch {args.batch_size}")
    print(f"  {'mode':<10} {'accepted/step':>14} {'tok/s':>8}")
    for name, params_of in modes.items():
        accepted, tps = run(target, draft, prompts, params_of, args.batch_size, args.max_nodes)
        print(f"  {name:<10} {accepted:>14.2f} {tps:>8.1f}")
    return 0
