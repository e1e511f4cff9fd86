"""`specrelay bench engine`: the engine's plain decoding step on a real model, against transformers `generate` and
against this machine's matmul floor, side by side in one process.

Per point (prompt length L, batch B): B distinct prompts of exactly L tokens (windows over the agentic workload's
text), greedy, no stop token, `--max-tokens` new tokens each. Only decoding is timed, on both sides: ours from the
engine's first step after `add` (prefill and first token done) to the last; transformers from its first
logits-processor call (its prefill done) to the end of `generate`.

    tokens_per_s, hf_tokens_per_s   B · decode steps / decode seconds
    step_ms                         median engine step (forward + acceptance + bookkeeping)
    floor_ms                        the model's own matmuls alone (every Linear of every layer, and the LM head) on
                                    B rows: what a step cannot go below without touching fewer weights
    f_linear_floor_ms               the same weights through plain F.linear (unpacked: what transformers pays)
    floor_fraction                  floor_ms / step_ms
    profile_ms                      one step split by wall timers: attention (KV write, gather, softmax), matmuls,
                                    other model ops (norms, RoPE, residuals, embedding), sampling (acceptance) and
                                    Python bookkeeping (the rest: batch building, block tables, commit)

The verify cost curve is t_verify(m) / t_verify(1): one forward of m new tokens after L tokens of context, the
curve the adaptive budget (services/verifier/budget.py) learns online.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from specrelay.models.resolve import DEFAULT_MODEL

    parser.add_argument("--model", default=DEFAULT_MODEL, help="a model directory, a .gguf file or a built-in model "
                        f"(default: {DEFAULT_MODEL}; the small pair: models/target)")
    parser.add_argument("--quick", action="store_true", help="batch 1 and 4, prompts of 32 and 64 tokens, 8 new "
                        "tokens, verify curve to m = 8 (seconds on the small pair)")
    parser.add_argument("--batch-sizes", default=None, help="comma-separated (default 1,4,8,16)")
    parser.add_argument("--prompt-lens", default=None, help="comma-separated tokens (default 128,1024)")
    parser.add_argument("--max-tokens", type=int, default=None, help="new tokens per prompt (default 32)")
    parser.add_argument("--max-verify", type=int, default=None, help="the verify curve's largest m (default 64)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1, as issue 16's "
                        "figures; the machine's cores: serve's default)")
    parser.add_argument("--json", type=Path, default=None, metavar="FILE")


def main(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    from specrelay.bench.engine_profile import verify_curve
    from specrelay.bench.report import finish_report
    from specrelay.models.resolve import resolve_model
    from specrelay.shared.modeling.loader import load_model

    torch.set_num_threads(args.threads)
    model_dir = resolve_model(args.model)
    batch_sizes = _ints(args.batch_sizes, "1,4" if args.quick else "1,4,8,16", "--batch-sizes")
    prompt_lens = _ints(args.prompt_lens, "32,64" if args.quick else "128,1024", "--prompt-lens")
    max_tokens = args.max_tokens or (8 if args.quick else 32)
    model = load_model(model_dir)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    stream = _token_stream(model_dir, max(batch_sizes) * 61 + max(prompt_lens))
    points = []
    for prompt_len, batch in itertools.product(prompt_lens, batch_sizes):
        prompts = [stream[b * 61 : b * 61 + prompt_len] for b in range(batch)]
        points.append(measure_point(model, hf, prompts, max_tokens))
        print_point(points[-1])
        if args.json:  # each point as it comes: a long sweep cut short keeps what it measured
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"model": model_dir.name, "points": points}, indent=2) + "\n")
    curve = verify_curve(model, stream[: prompt_lens[0]], args.max_verify or (8 if args.quick else 64))
    print("verify cost t(m)/t(1): " + " ".join(f"{m}:{r:.2f}" for m, r in zip(curve["m"], curve["ratio"])))
    report = {"model": model_dir.name, "threads": torch.get_num_threads(), "max_tokens": max_tokens,
              "points": points, "verify_curve": curve, "goals": goals(points)}
    finish_report(report, args.json)
    return 0


def _ints(text: str | None, default: str, flag: str) -> list[int]:
    from specrelay.shared.errors import ConfigError

    try:
        values = [int(x) for x in (default if text is None else text).split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise ConfigError(f"{flag} takes comma-separated positive integers, got {text!r}")
    return values


def _token_stream(model_dir: Path, length: int) -> list[int]:
    """The agentic workload's prompts (bench spec's), one after another, repeated to `length` tokens."""
    from specrelay.bench.spec import workloads

    text = [tok for prompt in workloads(str(model_dir), 16)["agentic"] for tok in prompt]
    return (text * (length // len(text) + 1))[:length]


def measure_point(model, hf, prompts: list[list[int]], max_tokens: int) -> dict:
    batch, prompt_len = len(prompts), len(prompts[0])
    ours, steps_s, profile = run_engine(model, prompts, max_tokens)
    theirs, hf_decode_s, hf_steps = run_hf(hf, prompts, max_tokens)
    step_s = statistics.median(steps_s)
    floor_s, f_linear_s = matmul_floor(model, batch)
    return {"prompt_len": prompt_len, "batch_size": batch,
            "tokens_per_s": round(batch * len(steps_s) / sum(steps_s), 2),
            "hf_tokens_per_s": round(batch * hf_steps / hf_decode_s, 2),
            "step_ms": round(1e3 * step_s, 2), "floor_ms": round(1e3 * floor_s, 2),
            "f_linear_floor_ms": round(1e3 * f_linear_s, 2),
            "floor_fraction": round(floor_s / step_s, 3),
            "profile_ms": {k: round(1e3 * v, 2) for k, v in profile.items()},
            "same_tokens_as_hf": sum(a == b for a, b in zip(ours, theirs)) / batch}


def run_engine(model, prompts: list[list[int]], max_tokens: int) -> tuple[list[list[int]], list[float], dict]:
    """Greedy plain decoding through the engine: outputs, each step's seconds, and the profile of the steps
    after the first few (timed separately, so the timers never touch the measured steps)."""
    from specrelay.bench.engine_profile import StepProfile
    from specrelay.services.verifier.engine import SpecEngine
    from specrelay.shared.modeling.runner import ModelRunner
    from specrelay.shared.sampling import SamplingParams

    num_blocks = len(prompts) * (-(-(len(prompts[0]) + max_tokens) // 16) + 1) + 16
    engine = SpecEngine(ModelRunner(model, num_blocks=num_blocks))
    requests = engine.add(prompts, [SamplingParams(max_tokens=max_tokens)] * len(prompts))
    steps_s, profiled = [], max(1, min(3, (max_tokens - 1) // 4))
    while engine.running and len(steps_s) < max_tokens - 1 - profiled:
        t0 = time.perf_counter()
        engine.step()
        steps_s.append(time.perf_counter() - t0)
    with StepProfile(engine) as profile:
        while engine.running:
            profile.step()
    return [r.output for r in requests], steps_s, profile.mean()


def run_hf(hf, prompts: list[list[int]], max_tokens: int) -> tuple[list[list[int]], float, int]:
    """transformers `generate`, greedy, no EOS: outputs, decode seconds (after its first logits) and steps."""
    import torch

    calls: list[float] = []

    def stamp(input_ids, scores):  # a logits processor: called once per step, the first right after prefill
        calls.append(time.perf_counter())
        return scores

    with torch.inference_mode():
        out = hf.generate(torch.tensor(prompts), attention_mask=torch.ones(len(prompts), len(prompts[0]),
                                                                           dtype=torch.long),
                          do_sample=False, max_new_tokens=max_tokens, eos_token_id=None, pad_token_id=0,
                          logits_processor=[stamp])
        end = time.perf_counter()
    return out[:, len(prompts[0]) :].tolist(), end - calls[0], len(calls) - 1


def matmul_floor(model, rows: int, repeats: int = 5) -> tuple[float, float]:
    """Median seconds of the model's own Linear modules, each once on `rows` random rows (the LM head too), and
    of plain F.linear on the same weights (what an unpacked weight costs: the figure issue 16 quotes)."""
    import torch
    import torch.nn.functional as F

    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    inputs = {m.in_features: torch.randn(rows, m.in_features, dtype=model.dtype) for m in linears}
    times: dict[str, list[float]] = {"model": [], "f_linear": []}
    with torch.inference_mode():
        for _ in range(repeats):
            for name, run in (("model", lambda m, x: m(x)), ("f_linear", lambda m, x: F.linear(x, m.weight))):
                t0 = time.perf_counter()
                for m in linears:
                    run(m, inputs[m.in_features])
                times[name].append(time.perf_counter() - t0)
    return statistics.median(times["model"]), statistics.median(times["f_linear"])


def goals(points: list[dict]) -> dict[str, bool]:
    """Issue 16's goals that this bench measures, at the first prompt length (the agentic and chat workloads'
    own figures come from `bench spec`)."""
    at = {(p["batch_size"]): p for p in points if p["prompt_len"] == points[0]["prompt_len"]}
    out = {}
    for batch, speedup, fraction in ((1, 1.1, 0.7), (8, 1.5, 0.6)):
        if batch in at:
            p = at[batch]
            faster = p["tokens_per_s"] >= speedup * p["hf_tokens_per_s"]
            out[f"batch {batch}: decode >= {speedup}x hf_generate"] = faster
            out[f"batch {batch}: floor_fraction >= {fraction}"] = p["floor_fraction"] >= fraction
    return out


def print_point(p: dict) -> None:
    profile = " ".join(f"{k} {v:.1f}" for k, v in p["profile_ms"].items())
    ours, theirs = p["tokens_per_s"], p["hf_tokens_per_s"]
    print(f"L={p['prompt_len']:<5} B={p['batch_size']:<3} tok/s {ours:>7.1f} hf {theirs:>7.1f} ({ours / theirs:.2f}x)"
          f"  step {p['step_ms']:.1f} ms  floor {p['floor_ms']:.1f} ms ({p['floor_fraction']:.2f})"
          f"  same as hf {p['same_tokens_as_hf']:.2f}  | ms: {profile}", flush=True)
