"""`specrelay bench spec|bus|relay|engine|structured|arrival|tir|seeded`: benchmarks that run ours and the baselines
side by side in one process and print ratios (the kernels have their own: `specrelay kernels bench`). Each bench
module has its own `add_arguments` and `main`; their shared tail is report.py."""

from __future__ import annotations

import argparse
import importlib

# name -> (module, add-arguments function, main function, help)
BENCHES = {
    "spec": ("specrelay.bench.spec", "add_arguments", "main",
             "speculative decoding vs transformers generate / assisted / prompt lookup and plain decoding"),
    "bus": ("specrelay.bench.bus", "add_arguments", "main",
            "per-step overhead of the local and Redis transports against the in-process engine"),
    "relay": ("specrelay.bench.relay", "add_relay_arguments", "main_relay",
              "RelayCaching vs full prefill, naive reuse and CacheBlend on multi-agent pipelines"),
    "engine": ("specrelay.bench.engine", "add_arguments", "main",
               "the engine's plain decoding step vs transformers generate and this machine's matmul floor"),
    "structured": ("specrelay.bench.structured", "add_arguments", "main",
                   "issue 17's constrained-decoding checks: forced tool calls, json_schema, greedy with/without "
                   "speculation"),
    "arrival": ("specrelay.bench.arrival", "add_arguments", "main",
                "a long prompt arriving among running streams: whole-prompt vs chunked prefill, TTFT and their gaps"),
    "seeded": ("specrelay.bench.seeded", "add_arguments", "main",
               "what a fixed seed costs speculation: accepted tokens per step, seeded vs unseeded vs greedy"),
    "tir": ("specrelay.bench.tir", "add_arguments", "main",
            "KV across tool pauses: drop, keep, the PTE policy and InferCept on multi-turn tool loops"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", metavar="BENCH", required=True)
    for name, (module_name, add, run, help_text) in BENCHES.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text, description=help_text)
        getattr(module, add)(p)
        p.set_defaults(_bench_main=getattr(module, run))


def main(args: argparse.Namespace) -> int:
    return args._bench_main(args)

