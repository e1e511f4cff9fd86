"""`specrelay bench spec`: speculative decoding against transformers and plain decoding, side by side, one process.

Same target/draft pair, same prompts, same greedy decoding, same stop tokens, for every system. tokens/s counts
generated tokens over the wall time of the whole workload at that batch size. `identical_to_greedy` compares every
output with the target's own greedy output (specrelay_plain, itself checked against hf_generate by the parity
tests). transformers' assisted generation and prompt lookup run one prompt at a time (they do not batch), so at
batch 8 their prompts run one after another.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

SYSTEMS = ("hf_generate", "hf_assisted", "hf_prompt_lookup", "specrelay_plain", "specrelay_chain", "specrelay_tree",
           "specrelay_recycle", "specrelay_suffix", "specrelay_head", "specrelay_hybrid")
NEEDS_DRAFT = ("hf_assisted", "specrelay_chain", "specrelay_tree")
NEEDS_HEAD = ("specrelay_head", "specrelay_hybrid")  # a draft head shipped for the model (models/heads/)
WORKLOADS = ("agentic", "chat", "relay", "code")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from specrelay.models.resolve import DEFAULT_MODEL

    parser.add_argument("--model", default=DEFAULT_MODEL, help="a model directory, a .gguf file or a built-in model "
                        f"(default: {DEFAULT_MODEL}; the small pair: models/target)")
    parser.add_argument("--draft", default=None, help="the draft model of hf_assisted, specrelay_chain and "
                        "specrelay_tree (default: the pair's draft for the pair's target; none for other models, "
                        "and those systems are left out)")
    parser.add_argument("--quick", action="store_true", help="fewer, shorter generations (about a minute)")
    parser.add_argument("--num-prompts", type=int, default=None)
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--systems", default=None, help=f"comma-separated, from {', '.join(SYSTEMS)} (default: "
                        "all that the model can run)")
    parser.add_argument("--workloads", default="agentic,chat", help=f"comma-separated, from {', '.join(WORKLOADS)}")
    parser.add_argument("--max-nodes", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: small models are overhead-bound, and two threads "
                             "on two shared cores spin against each other)")
    parser.add_argument("--json", default=None, metavar="FILE")


def workloads(model_dir: str, num_prompts: int) -> dict[str, list[list[int]]]:
    """agentic: held-out tool-use prompts (the answer is a tool call: JSON); chat: plain questions, with no tools in
    the system turn; relay: a worker agent carrying out, and quoting, a planner agent's plan; code: edit a given
    function and return all of it (the output repeats the input). Seeds and sources apart from the draft head's
    training prompts (models/head_data.py)."""
    import random

    from specrelay.models.corpus import PythonSource, _plan, tool_prompts
    from specrelay.models.tools_catalog import NAMES, TOPICS
    from specrelay.shared.tokenizer import Tokenizer

    tok = Tokenizer(model_dir)
    agentic = [tok.apply_chat_template(p.messages, tools=p.tools) for p in tool_prompts(seed=7, num_prompts=num_prompts)]
    topics = ["the weather in Lisbon", "how to sort a list in Python", "the sum of 17 and 25", "a plan for a trip",
              "what JSON is", "the capital of Norway", "a short summary of a meeting", "how to read a file"]
    chat = [tok.apply_chat_template([{"role": "user", "content": f"Tell me about {topics[i % len(topics)]}."}])
            for i in range(num_prompts)]
    r, source = random.Random(77), PythonSource("val")
    relay = [tok.apply_chat_template([
        {"role": "system", "content": "You are the worker agent."},
        {"role": "user", "content": f"{r.choice(NAMES)}'s planner wrote:\n\"\"\"\n{_plan(r, r.choice(TOPICS))}\n\"\"\"\n"
                                    "Carry out every step, quoting each one."}]) for _ in range(num_prompts)]
    code = [tok.apply_chat_template([{"role": "user", "content": "Add a comment above each line of this code and "
                                      f"return all of it:\n```python\n{source.chunk(r)}\n```"}])
            for _ in range(num_prompts)]
    return {"agentic": agentic, "chat": chat, "relay": relay, "code": code}


def stop_ids(model_dir: str) -> tuple[int, ...]:
    from specrelay.shared.tokenizer import Tokenizer

    tok = Tokenizer(model_dir)
    return tuple(i for i in (tok.eos_token_id, tok.token_to_id("<|endoftext|>")) if i is not None)


def run_specrelay(name: str, target, draft, prompts, batch, params, max_nodes, model_dir: str | None = None):
    from specrelay.services.drafter.draft_model import DraftModelProposer
    from specrelay.services.drafter.recycling import TokenRecyclingProposer
    from specrelay.services.drafter.service import build_head_proposer
    from specrelay.services.drafter.suffix import SuffixProposer
    from specrelay.services.verifier.engine import SpecEngine
    from specrelay.shared.modeling.runner import ModelRunner

    make = {
        "specrelay_plain": lambda: None,
        "specrelay_chain": lambda: DraftModelProposer.chain(ModelRunner(draft, num_blocks=2048), length=4),
        "specrelay_tree": lambda: DraftModelProposer(ModelRunner(draft, num_blocks=2048)),
        "specrelay_recycle": lambda: TokenRecyclingProposer(target.config.vocab_size),
        "specrelay_suffix": lambda: SuffixProposer(target.config.vocab_size),
        "specrelay_head": lambda: build_head_proposer("head", Path(model_dir)),
        "specrelay_hybrid": lambda: build_head_proposer("hybrid", Path(model_dir)),
    }[name]
    proposer = make()
    engine = SpecEngine(ModelRunner(target, num_blocks=2048), proposer, max_nodes=max_nodes)
    engine.generate(prompts[:batch], params)  # warm-up: the cost curve and Â(n) start from measurements
    if name in ("specrelay_suffix", "specrelay_hybrid"):  # its global tree would hold the very outputs measured next
        proposer = engine.proposer = make()
    # one engine serves the whole workload, as a server would: the suffix tree learns from earlier prompts' outputs
    outputs, steps, accepted = [], 0, 0
    t0 = time.perf_counter()
    for start in range(0, len(prompts), batch):
        for req in engine.generate(prompts[start : start + batch], params):
            outputs.append(req.output)
            steps += req.stats.steps
            accepted += req.stats.accepted_tokens
    elapsed = time.perf_counter() - t0
    mean_accepted = accepted / steps if proposer is not None and steps else None
    return outputs, elapsed, mean_accepted


def run_hf(name: str, hf_target, hf_draft, prompts, batch, max_tokens, stops):
    import torch

    outputs = []
    kwargs = dict(do_sample=False, max_new_tokens=max_tokens, eos_token_id=list(stops), pad_token_id=stops[-1])
    if name == "hf_assisted":
        kwargs["assistant_model"] = hf_draft
    if name == "hf_prompt_lookup":
        kwargs["prompt_lookup_num_tokens"] = 4
    groups = [prompts[i : i + batch] for i in range(0, len(prompts), batch)] if name == "hf_generate" else [
        [p] for p in prompts]
    with torch.inference_mode():
        hf_target.generate(torch.tensor([prompts[0]]), **{**kwargs, "max_new_tokens": 4})  # warm-up
        t0 = time.perf_counter()
        for group in groups:
            width = max(len(p) for p in group)
            ids = torch.tensor([[stops[-1]] * (width - len(p)) + p for p in group])  # left padding
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group])
            out = hf_target.generate(ids, attention_mask=mask, **kwargs)[:, width:].tolist()
            for row in out:
                cut = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
                outputs.append(row[:cut])
        elapsed = time.perf_counter() - t0
    return outputs, elapsed, None


def main(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    from specrelay.models.resolve import check_same_vocabulary, pair_draft, resolve_model
    from specrelay.shared.modeling.loader import load_model
    from specrelay.shared.sampling import SamplingParams

    model_dir = resolve_model(args.model)
    draft_dir = resolve_model(args.draft, "--draft") if args.draft else pair_draft(model_dir)
    if draft_dir is not None:
        check_same_vocabulary(model_dir, draft_dir)
    args.model, args.draft = str(model_dir), None if draft_dir is None else str(draft_dir)
    systems, chosen = choose(args, model_dir, draft_dir)
    if args.threads:
        torch.set_num_threads(args.threads)
    num_prompts = args.num_prompts or (4 if args.quick else 16)
    max_tokens = args.max_tokens or (32 if args.quick else 128)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    target = load_model(args.model)
    draft = None if args.draft is None else load_model(args.draft)
    hf_target = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    hf_draft = None if args.draft is None else AutoModelForCausalLM.from_pretrained(args.draft,
                                                                                    dtype=torch.float32).eval()
    stops = stop_ids(args.model)
    params = SamplingParams(max_tokens=max_tokens, stop_token_ids=stops)
    runs = []
    for workload, prompts in workloads(args.model, num_prompts).items():
        for batch in batch_sizes if workload in chosen else []:
            results, reference = {}, None
            for system in sorted(systems, key=lambda s: s != "specrelay_plain"):
                if system.startswith("hf_"):
                    outputs, elapsed, mean_acc = run_hf(system, hf_target, hf_draft, prompts, batch, max_tokens,
                                                        stops)
                else:
                    outputs, elapsed, mean_acc = run_specrelay(system, target, draft, prompts, batch, params,
                                                               args.max_nodes, args.model)
                if system == "specrelay_plain":
                    reference = outputs
                tokens = sum(len(o) for o in outputs)
                results[system] = {"tokens_per_s": round(tokens / elapsed, 1),
                                   "mean_accepted_tokens": None if mean_acc is None else round(mean_acc, 2),
                                   "identical_to_greedy": reference is not None and outputs == reference}
            runs.append({"workload": workload, "batch_size": batch, "systems": results})
            print_run(runs[-1])
    if args.json:
        Path(args.json).write_text(json.dumps({"model": Path(args.model).name, "runs": runs, "num_prompts": num_prompts,
                                               "max_tokens": max_tokens, "threads": torch.get_num_threads()},
                                              indent=2))
    return 0


def choose(args: argparse.Namespace, model_dir: Path, draft_dir: Path | None) -> tuple[list[str], list[str]]:
    """(systems, workloads) from the flags; by default every system the model can run."""
    from specrelay.models.resolve import default_head
    from specrelay.shared.errors import ConfigError

    has_head = default_head(model_dir) is not None
    systems = [s for s in (args.systems or "").split(",") if s] or [
        s for s in SYSTEMS if (draft_dir is not None or s not in NEEDS_DRAFT) and (has_head or s not in NEEDS_HEAD)]
    chosen = [w for w in args.workloads.split(",") if w]
    if bad := [w for w in chosen if w not in WORKLOADS]:
        raise ConfigError(f"unknown workload {bad[0]!r} (choose from {', '.join(WORKLOADS)})")
    if unknown := [s for s in systems if s not in SYSTEMS]:
        raise ConfigError(f"unknown system {unknown[0]!r} (choose from {', '.join(SYSTEMS)})")
    if draft_dir is None and (needing := [s for s in systems if s in NEEDS_DRAFT]):
        raise ConfigError(f"{needing[0]} needs a draft model of {model_dir.name}'s vocabulary: pass --draft")
    if not has_head and (needing := [s for s in systems if s in NEEDS_HEAD]):
        raise ConfigError(f"{needing[0]} needs a draft head trained for {model_dir.name} (models/heads/)")
    return systems, chosen


def print_run(run: dict) -> None:
    systems = run["systems"]
    base = systems.get("specrelay_plain", {}).get("tokens_per_s")
    assisted = systems.get("hf_assisted", {}).get("tokens_per_s")
    print(f"\n{run['workload']} @ batch {run['batch_size']}")
    print(f"  {'system':<18} {'tok/s':>8} {'vs plain':>9} {'vs hf_assisted':>15} {'accepted/step':>14} identical")
    for name, r in systems.items():
        vs_plain = f"{r['tokens_per_s'] / base:.2f}x" if base else "-"
        vs_assisted = f"{r['tokens_per_s'] / assisted:.2f}x" if assisted else "-"
        acc = "-" if r["mean_accepted_tokens"] is None else f"{r['mean_accepted_tokens']:.2f}"
        print(f"  {name:<18} {r['tokens_per_s']:>8.1f} {vs_plain:>9} {vs_assisted:>15} {acc:>14} "
              f"{r['identical_to_greedy']}")
