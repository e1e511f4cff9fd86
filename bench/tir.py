"""`specrelay bench tir`: KV across tool pauses — drop, keep, the PTE policy (and InferCept) on one workload.

Workload (tir_workload.py): seeded multi-turn tool loops — calculator (ms pauses, short answers), search (sub-second
to seconds, 300–1,500-token responses), human (seconds) — run interleaved on the verifier engine with continuous
batching (speculation off), real forwards and real KV offload/reload through the kvstore (in-process backend).

Time (tir_run.py): wall_s is a virtual clock that advances by the measured elapsed time of every loop iteration
that computed, and jumps over stretches where every trajectory sat in a tool pause: the wall time of the run as if
the pauses had been waited, without waiting them. compute_s is the computing part alone. A trajectory's latency is
its time waiting on the model (own pauses excluded); `corr_wall_pte` and `corr_wall_tokens` are the Pearson
correlations of that latency with the trajectory's PTE and with its token count (prompt + generated + tool
responses), over every (policy, trajectory) pair of the run: the same trajectory costs different amounts under
different policies, which a token count cannot see.

KV budget: `--kv-budget-blocks`, or by default `--budget-fraction` of the peak that keep-everything reached on the
same workload (keep runs first, unbounded). drop, pte and infercept run with a cache of exactly the budget.

PTE profile: `--profile FILE` (what `specrelay calibrate` writes), else measured here first exactly as `specrelay
calibrate` measures it (services/calibrate.py: prefill time against prompt length, one sequence's decode step
against context length, this model on this machine), so that the bench's PTE is the PTE the server reports in
usage.pte. `--profile-decode-batch N` times the decode step in a batch of N instead and divides by N: a
per-sequence share of the step, the better figure for throughput cost; for a trajectory's latency the whole step
is what it waits per token (README: it correlates less).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import statistics
import time
from dataclasses import asdict
from pathlib import Path

from specrelay.bench.report import finish_report

DEFAULT_MODEL = "smollm2-135m-instruct"  # the default served model (models/resolve.py); the small pair: models/target
BLOCK_SIZE = 16


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from specrelay.bench.tir_run import POLICIES

    parser.add_argument("--model", type=Path, default=Path(DEFAULT_MODEL), help="a model directory, a .gguf file "
                        f"or a built-in model (default: {DEFAULT_MODEL}; the small pair: models/target)")
    parser.add_argument("--quick", action="store_true", help="6 trajectories of at most 3 tool calls, policies "
                        "drop, keep, pte, and a quick profile (under a minute)")
    parser.add_argument("--json", type=Path, default=None, metavar="FILE", help="write the results here")
    parser.add_argument("--trajectories", type=int, default=None, help="default 20 (quick: 6)")
    parser.add_argument("--max-turns", type=int, default=None, help="tool calls per trajectory, at most "
                        "(default 6; quick: 3)")
    parser.add_argument("--policies", default=None, help=f"comma-separated, from {','.join(POLICIES)} (default: "
                        "all; quick: drop,keep,pte); drop and keep always run")
    parser.add_argument("--kv-budget-blocks", type=int, default=None, help=f"device KV budget in {BLOCK_SIZE}-token "
                        "blocks (default: --budget-fraction of keep's peak)")
    parser.add_argument("--budget-fraction", type=float, default=0.5)
    parser.add_argument("--profile", type=Path, default=None, help="a PTE profile JSON (default: measure one now, "
                        "as `specrelay calibrate` does)")
    parser.add_argument("--profile-decode-batch", type=int, default=1, metavar="N", help="measure the decode step "
                        "in a batch of N sequences, per sequence (default 1: as `specrelay calibrate`)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: two shared "
                        "cores)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)


def main(args: argparse.Namespace) -> int:
    import torch

    from specrelay.bench.tir_run import POLICIES
    from specrelay.bench.tir_workload import WorkloadConfig, make_workload
    from specrelay.services.verifier.prefix_cache import model_id
    from specrelay.shared.errors import ConfigError
    from specrelay.shared.modeling.loader import load_model
    from specrelay.models.resolve import BUILTIN_MODELS, resolve_model
    from specrelay.shared.modeling.runner import ModelRunner

    if args.model.suffix == ".gguf" or str(args.model) in BUILTIN_MODELS:
        args.model = resolve_model(args.model)  # a .gguf file or a built-in model name
    policies = _policies(args.policies or ("drop,keep,pte" if args.quick else ",".join(POLICIES)))
    if not (args.model / "config.json").is_file():
        raise ConfigError(f"{args.model}: no model there (train the embedded pair with `specrelay models train`, "
                          "or pass --model DIR)")
    if not 0 < args.budget_fraction <= 1:
        raise ConfigError(f"--budget-fraction must be in (0, 1], got {args.budget_fraction}")
    if args.profile_decode_batch < 1:
        raise ConfigError(f"--profile-decode-batch must be at least 1, got {args.profile_decode_batch}")
    torch.set_num_threads(args.threads)
    model = load_model(args.model, device=args.device)
    cfg = model.config
    workload_cfg = WorkloadConfig(
        num_trajectories=args.trajectories or (6 if args.quick else 20),
        max_turns=args.max_turns or (3 if args.quick else 6),
        max_context=min(4000, cfg.max_model_len - 16), vocab=(min(16, cfg.vocab_size // 2), cfg.vocab_size),
        seed=args.seed)
    trajectories = make_workload(workload_cfg)
    longest = max(-(-t.total_tokens // BLOCK_SIZE) for t in trajectories)
    if args.kv_budget_blocks is not None and args.kv_budget_blocks < longest + 2:
        raise ConfigError(f"--kv-budget-blocks {args.kv_budget_blocks} cannot hold this workload's longest "
                          f"trajectory ({longest} blocks and a 2-block margin)")
    mid = model_id(args.model, model.dtype)

    def runner(num_blocks: int) -> ModelRunner:
        return ModelRunner(model, num_blocks=num_blocks, block_size=BLOCK_SIZE, prefill_chunk=512)

    profile = tir_profile(args, runner, model)
    print(f"profile: p={profile.prefill_s_per_token * 1e6:.1f} us/token, gamma={profile.gamma:.4g}, "
          f"beta={profile.beta:.1f} ({'loaded' if args.profile else 'measured'})", flush=True)
    offload_bps, reload_bps = measure_store_bandwidth(runner(2 * 1024 // BLOCK_SIZE + 4), mid, cfg.vocab_size)

    bpb = runner(1).cache.bytes_per_block()
    results, budget_blocks = run_policies(policies, trajectories, runner, mid, profile, (offload_bps, reload_bps),
                                          args.kv_budget_blocks, args.budget_fraction)
    report = build_report(results, trajectories, budget_blocks, bpb, profile,
                          workload_cfg, (offload_bps, reload_bps))
    print(table(report))
    finish_report(report, args.json)
    return 0


def tir_profile(args: argparse.Namespace, make_runner, model):
    """The PTE profile the bench prices with: loaded from --profile, else measured on this model here (calibrate's
    fit at decode batch 1, else `measure_tir_profile` at --profile-decode-batch). `make_runner(num_blocks)`."""
    from specrelay.shared.pte import PteProfile

    if args.profile:
        return PteProfile.load(args.profile)
    runner = make_runner(4 * model.config.max_model_len // BLOCK_SIZE)
    if args.profile_decode_batch == 1:
        from specrelay.services.calibrate import FULL_LENGTHS, QUICK_LENGTHS, calibrate

        lengths = QUICK_LENGTHS if args.quick else FULL_LENGTHS
        return calibrate(runner, lengths, lengths, 2 if args.quick else 3, device=str(model.device),
                         model=args.model.name)
    return measure_tir_profile(runner, model.config.vocab_size, args.quick, str(model.device), args.model.name,
                               batch=args.profile_decode_batch)


def _policies(text: str) -> list[str]:
    """keep first (an unset budget is a fraction of its peak), then drop (the baseline), then the rest."""
    from specrelay.bench.tir_run import POLICIES
    from specrelay.shared.errors import ConfigError

    chosen = [p.strip() for p in text.split(",") if p.strip()]
    unknown = sorted(set(chosen) - set(POLICIES))
    if unknown:
        raise ConfigError(f"--policies: unknown {', '.join(unknown)} (choose from {', '.join(POLICIES)})")
    return ["keep", "drop"] + [p for p in POLICIES if p in chosen and p not in ("keep", "drop")]


def run_policies(policies, trajectories, runner, mid: str, profile, bandwidths: tuple[float, float],
                 budget_blocks: int | None, budget_fraction: float):
    """Each policy over the same trajectories on a fresh cache and kvstore: keep unbounded, the others with a
    cache of exactly the budget. Returns (results by policy, budget in blocks)."""
    from specrelay.services.kvstore import make_store
    from specrelay.services.toolcoord.retention import RetentionConfig
    from specrelay.bench.tir_run import TirRun, make_policy

    bpb = runner(1).cache.bytes_per_block()
    longest = max(-(-t.total_tokens // BLOCK_SIZE) for t in trajectories)
    unbounded = sum(-(-t.total_tokens // BLOCK_SIZE) for t in trajectories) + 1
    results = {}
    for name in policies:
        bounded = name != "keep"
        if bounded and budget_blocks is None:
            budget_blocks = max(longest + 2, round(budget_fraction * results["keep"].peak_kv_bytes / bpb))
        num_blocks = budget_blocks if bounded else unbounded
        retention = RetentionConfig(kv_budget_bytes=num_blocks * bpb, kv_bytes_per_token=bpb // BLOCK_SIZE,
                                    offload_bytes_per_s=bandwidths[0], reload_bytes_per_s=bandwidths[1],
                                    offload_stall_fraction=1.0)  # the copy-out is synchronous in this loop
        run = TirRun(runner(num_blocks), make_store(None, 4 * unbounded * bpb), mid, name,
                     make_policy(name, profile, retention), profile, num_blocks)
        t0 = time.perf_counter()
        results[name] = asyncio.run(run.run(trajectories))
        print(f"  {name}: wall {results[name].wall_s:.2f} s (ran {time.perf_counter() - t0:.1f} s)", flush=True)
    return results, budget_blocks


def measure_tir_profile(runner, vocab_size: int, quick: bool, device: str, model: str, batch: int):
    """pte.measure_profile on this runner: prefill seconds against prompt length, and a decode step's seconds per
    sequence against context length in a batch of `batch` sequences (each a fork of one prefilled context). This
    runtime's batched attention reads every sequence's KV, so the per-sequence share has a larger γ and a smaller
    β than a lone sequence's step."""
    import torch

    from specrelay.shared.modeling.kv_cache import BlockTable
    from specrelay.shared.modeling.runner import StepInput
    from specrelay.shared.pte import measure_profile

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(min(16, vocab_size // 2), vocab_size, (4096,), generator=gen).tolist()
    contexts: dict[int, BlockTable] = {}

    def prefill_s(n: int) -> float:
        table = BlockTable()
        t0 = time.perf_counter()
        runner.prefill(table, ids[:n])
        dt = time.perf_counter() - t0
        runner.release(table)
        return dt

    def decode_step_s(length: int) -> float:
        if length not in contexts:
            contexts[length] = BlockTable()
            runner.prefill(contexts[length], ids[:length])
        tables = [runner.cache.fork(contexts[length]) for _ in range(batch)]
        t0 = time.perf_counter()
        runner.forward([StepInput(t, [ids[length]]) for t in tables])
        dt = time.perf_counter() - t0
        for t in tables:
            runner.release(t)
        return dt / batch

    lengths = (128, 512, 1024) if quick else (128, 256, 512, 1024, 2048)
    ctx = (128, 1024, 2048) if quick else (128, 512, 1024, 2048, 3072)
    prefill_s(64)  # first forward pays one-off allocations
    profile = measure_profile(prefill_s, decode_step_s, lengths, ctx, repeats=2 if quick else 3, device=device,
                              model=model)
    for table in contexts.values():
        runner.release(table)
    return profile


def measure_store_bandwidth(runner, mid: str, vocab_size: int) -> tuple[float, float]:
    """Bytes per second of PrefixCache.save and .load with the in-process kvstore, 1,024 tokens, best of three:
    what the retention policy's offload cost uses."""
    from specrelay.services.kvstore import make_store
    from specrelay.services.verifier.prefix_cache import PrefixCache
    from specrelay.shared.modeling.kv_cache import BlockTable

    n, bpb = 1024, runner.cache.bytes_per_block()
    best_out = best_in = math.inf
    for trial in range(3):
        ids = [min(16, vocab_size // 2) + (7 * i + trial) % (vocab_size // 2) for i in range(n + 1)]
        table = BlockTable()
        runner.prefill(table, ids[:n])
        cache = PrefixCache(make_store(None, 4 * n * bpb), mid, runner.cache)
        t0 = time.perf_counter()
        asyncio.run(cache.save(table, ids[:n]))
        best_out = min(best_out, time.perf_counter() - t0)
        runner.release(table)
        t0 = time.perf_counter()
        loaded = asyncio.run(cache.load(table, ids))
        best_in = min(best_in, time.perf_counter() - t0)
        runner.release(table)
        assert loaded == n, "the store lost blocks it had room for"
    nbytes = n // runner.cache.block_size * bpb
    return nbytes / best_out, nbytes / best_in


def pearson(xs: list[float], ys: list[float]) -> float:
    if len(xs) < 2 or statistics.pstdev(xs) == 0 or statistics.pstdev(ys) == 0:
        return math.nan
    return statistics.correlation(xs, ys)


def build_report(results, trajectories, budget_blocks, bpb, profile, workload_cfg, bandwidths) -> dict:
    drop = results["drop"]
    budget_bytes = budget_blocks * bpb
    tokens = {t.trajectory_id: t.total_tokens for t in trajectories}
    pairs = [(tr.latency_s, tr.pte, tokens[tr.trajectory_id]) for r in results.values() for tr in r.trajectories]
    policies = {}
    for name, r in results.items():
        same = sum(a.outputs == b.outputs for a, b in zip(r.trajectories, drop.trajectories))
        lat = [t.latency_s for t in r.trajectories]
        policies[name] = {
            "wall_s": round(r.wall_s, 4), "pte": round(r.pte, 1), "recomputed_tokens": r.recomputed_tokens,
            "peak_kv_bytes": r.peak_kv_bytes,
            "compute_s": round(r.compute_s, 4), "idle_s": round(r.wall_s - r.compute_s, 4),
            "within_budget": r.peak_kv_bytes <= budget_bytes,
            "reloaded_tokens": sum(t.reloaded_tokens for t in r.trajectories),
            "peak_kvstore_bytes": r.peak_store_bytes, "decisions": r.decisions,
            "mean_latency_s": round(statistics.fmean(lat), 4),
            "corr_wall_pte": _round(pearson(lat, [t.pte for t in r.trajectories])),
            "corr_wall_tokens": _round(pearson(lat, [tokens[t.trajectory_id] for t in r.trajectories])),
            "outputs_same_as_drop": f"{same}/{len(r.trajectories)}",
        }
    corr_pte = pearson([p[0] for p in pairs], [p[1] for p in pairs])
    corr_tokens = pearson([p[0] for p in pairs], [float(p[2]) for p in pairs])
    report = {"policies": policies, "corr_wall_pte": _round(corr_pte), "corr_wall_tokens": _round(corr_tokens),
              "kv_budget_blocks": budget_blocks, "kv_budget_bytes": budget_bytes, "block_size": BLOCK_SIZE,
              "profile": asdict(profile),
              "kvstore": {"backend": "local", "offload_bytes_per_s": round(bandwidths[0]),
                          "reload_bytes_per_s": round(bandwidths[1])},
              "workload": {**asdict(workload_cfg), "tool_calls": sum(len(t.turns) for t in trajectories),
                           "total_tokens": sum(tokens.values())},
              "trajectories": [
                  {"trajectory_id": t.trajectory_id, "tool_calls": [turn.tool for turn in t.turns],
                   "total_tokens": t.total_tokens,
                   "latency_s": {n: round(r.trajectories[i].latency_s, 4) for n, r in results.items()},
                   "pte": {n: round(r.trajectories[i].pte, 1) for n, r in results.items()}}
                  for i, t in enumerate(trajectories)],
              "clock": "virtual: measured compute time, plus jumps over stretches where every trajectory was in a "
                       "tool pause; per-trajectory latency excludes its own pauses",
              "speculation": "off"}
    if "pte" in policies:
        pte = policies["pte"]
        report["goals"] = {
            "pte_wall_30pct_below_drop": pte["wall_s"] <= 0.7 * policies["drop"]["wall_s"],
            "pte_peak_kv_within_budget": pte["within_budget"],
            "corr_wall_pte_at_least_0.9": corr_pte >= 0.9,
            "corr_wall_pte_above_corr_wall_tokens": corr_pte > corr_tokens,
        }
    else:
        report["goals"] = {}
    return report


def _round(x: float) -> float | None:
    return None if math.isnan(x) else round(x, 4)


def table(report: dict) -> str:
    p = report["policies"]
    drop = p["drop"]
    lines = [f"KV budget {report['kv_budget_blocks']} blocks = {report['kv_budget_bytes'] / 2**20:.1f} MiB; "
             f"{report['workload']['num_trajectories']} trajectories, {report['workload']['tool_calls']} tool calls",
             f"{'policy':<10} {'wall_s':>8} {'x drop':>7} {'compute_s':>9} {'PTE':>10} {'x drop':>7} "
             f"{'recomputed':>10} {'peak KV MiB':>11} {'<=budget':>8}  decisions"]
    for name, r in p.items():
        lines.append(f"{name:<10} {r['wall_s']:>8.2f} {r['wall_s'] / drop['wall_s']:>7.2f} {r['compute_s']:>9.2f} "
                     f"{r['pte']:>10.0f} {r['pte'] / drop['pte']:>7.2f} {r['recomputed_tokens']:>10} "
                     f"{r['peak_kv_bytes'] / 2**20:>11.1f} {'yes' if r['within_budget'] else 'NO':>8}  "
                     + ", ".join(f"{k} {v}" for k, v in sorted(r["decisions"].items())))
    lines.append(f"corr(latency, PTE) = {report['corr_wall_pte']}   corr(latency, tokens) = "
                 f"{report['corr_wall_tokens']}   (every policy's trajectories pooled)")
    return "\n".join(lines)
