"""`specrelay bench arrival`: what a long prompt's arrival does to running streams, with whole-prompt prefill and
with chunked prefill (services/verifier/chunked_prefill.py), side by side in one process.

`--streams` requests of `--stream-len` prompt tokens decode greedily (plain decoding, the verifier's scheduler and
engine driven step by step, as the verifier service does); after `--warm-steps` steps a `--long-len`-token prompt
arrives. Per mode:

    long_ttft_ms            the long prompt's arrival to its first token
    stall_itl_ms_max        the running streams' longest gap between tokens while it was prefilled (arrival to its
                            first token): how long they stalled
    stall_itl_ms_p50        their median gap over the same window
    itl_ms_p50              their median gap over the whole run
    same_outputs            every output equal to the whole-prompt run's, token for token
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from specrelay.models.resolve import DEFAULT_MODEL

    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"a model (default: {DEFAULT_MODEL})")
    parser.add_argument("--streams", type=int, default=4, help="running streams (default 4)")
    parser.add_argument("--stream-len", type=int, default=128, help="their prompt tokens (default 128)")
    parser.add_argument("--long-len", type=int, default=2000, help="the arriving prompt's tokens (default 2000)")
    parser.add_argument("--chunks", default="256,512", help="chunk budgets to compare with whole-prompt prefill "
                        "(comma-separated tokens per step; default 256,512)")
    parser.add_argument("--warm-steps", type=int, default=4, help="decode steps before the long prompt arrives")
    parser.add_argument("--max-tokens", type=int, default=48, help="new tokens per stream (default 48)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--json", type=Path, default=None, metavar="FILE")


def main(args: argparse.Namespace) -> int:
    import torch

    from specrelay.bench.engine import _ints, _token_stream
    from specrelay.bench.report import finish_report
    from specrelay.models.resolve import resolve_model
    from specrelay.shared.modeling.loader import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = resolve_model(args.model)
    model = load_model(model_dir)
    stream = _token_stream(model_dir, args.streams * 61 + args.stream_len + args.long_len)
    prompts = [stream[i * 61 : i * 61 + args.stream_len] for i in range(args.streams)]
    long_prompt = stream[-args.long_len :]
    modes = [0, *_ints(args.chunks, "256,512", "--chunks")]
    rows, outputs = [], {}
    for chunk in modes:
        row, outputs[chunk] = run_mode(model, prompts, long_prompt, chunk, args.warm_steps, args.max_tokens)
        row["same_outputs"] = outputs[chunk] == outputs[0]
        rows.append(row)
        print(f"{row['mode']:>12}: long prompt TTFT {row['long_ttft_ms']:8.0f} ms | streams while it prefills: "
              f"longest gap {row['stall_itl_ms_max']:7.0f} ms, median {row['stall_itl_ms_p50']:6.0f} ms | "
              f"median gap overall {row['itl_ms_p50']:5.0f} ms | same outputs: {row['same_outputs']}", flush=True)
    whole = rows[0]
    goals = {f"chunk {r['chunk']}: streams' longest gap below whole-prompt prefill's, outputs unchanged":
             r["stall_itl_ms_max"] < whole["stall_itl_ms_max"] and r["same_outputs"] for r in rows[1:]}
    report = {"model": model_dir.name, "threads": torch.get_num_threads(), "streams": args.streams,
              "stream_len": args.stream_len, "long_len": args.long_len, "rows": rows, "goals": goals}
    finish_report(report, args.json)
    return 0


def run_mode(model, prompts: list[list[int]], long_prompt: list[int], chunk: int, warm_steps: int,
             max_tokens: int) -> tuple[dict, dict[str, list[int]]]:
    from specrelay.services.verifier.chunked_prefill import ChunkedPrefill
    from specrelay.services.verifier.engine import SpecEngine
    from specrelay.services.verifier.scheduler import CacheBudget, Scheduler, SchedulerConfig
    from specrelay.shared.messages import Generate, SamplingSpec
    from specrelay.shared.modeling.runner import ModelRunner

    tokens = len(prompts) * (len(prompts[0]) + max_tokens) + len(long_prompt) + 64
    engine = SpecEngine(ModelRunner(model, num_blocks=tokens // 16 + 64), speculate=False)
    if chunk:
        engine.chunked = ChunkedPrefill(engine.runner, chunk)
    sched = Scheduler(SchedulerConfig(max_batch=len(prompts) + 1, max_nodes=engine.max_nodes,
                                      max_model_len=engine.runner.max_model_len, chunked_prefill=chunk > 0),
                      CacheBudget(engine.runner.cache))
    sampling = SamplingSpec(max_tokens=max_tokens)
    for i, prompt in enumerate(prompts):
        sched.add_request(_Delivery(Generate(f"s{i}", prompt, sampling, "")), first_turn=True)
    outputs: dict[str, list[int]] = {}
    arrivals: dict[str, list[float]] = {}  # request id -> the time of each step that gave it tokens
    long_at = None
    for step in range(10_000):
        if step == warm_steps + 1:  # the streams' prefill step, then `warm_steps` decode steps
            long_at = time.perf_counter()
            sched.add_request(_Delivery(Generate("long", long_prompt, SamplingSpec(max_tokens=4), "")), True)
        plan = sched.schedule()
        if not plan.runs_engine and not sched.waiting:
            break
        for release in plan.releases:
            engine.release(release.kv)
        replies = sched.update(plan, engine.execute(plan))
        now = time.perf_counter()
        for reply in replies:
            rid = reply.serving.msg.request_id
            outputs.setdefault(rid, []).extend(reply.token_ids)
            arrivals.setdefault(rid, []).append(now)
            if reply.release is not None:
                engine.release(reply.release.kv)
    first_s = arrivals["long"][0]
    gaps, stall = [], []
    for rid, times in arrivals.items():
        if rid == "long":
            continue
        for before, after in zip(times, times[1:]):
            gaps.append(after - before)
            if after > long_at and before < first_s:
                stall.append(after - before)
    row = {"mode": f"chunk {chunk}" if chunk else "whole prompt", "chunk": chunk,
           "long_ttft_ms": round(1e3 * (first_s - long_at), 1),
           "stall_itl_ms_max": round(1e3 * max(stall), 1), "stall_itl_ms_p50": round(1e3 * statistics.median(stall), 1),
           "itl_ms_p50": round(1e3 * statistics.median(gaps), 1)}
    return row, outputs


class _Delivery:
    def __init__(self, msg):
        self.msg, self.stream, self.message_id = msg, "bench", "0-0"
