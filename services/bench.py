"""`specrelay bench spec|bus|relay|tir`: benchmarks that run ours and the baselines side by side in one process and print
ratios (the kernels have their own: `specrelay kernels bench`)."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

# name -> (module, add-arguments function, main function, help)
BENCHES = {
    "spec": ("specrelay.services.verifier.bench_spec", "add_arguments", "main",
             "speculative decoding vs transformers generate / assisted / prompt lookup and plain decoding"),
    "bus": ("specrelay.services.verifier.bench_bus", "add_arguments", "main",
            "per-step overhead of the local and Redis transports against the in-process engine"),
    "relay": ("specrelay.services.verifier.relay_bench", "add_relay_arguments", "main_relay",
              "RelayCaching vs full prefill, naive reuse and CacheBlend on multi-agent pipelines"),
    "tir": ("specrelay.services.toolcoord.bench_tir", "add_arguments", "main",
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


def finish_report(report: dict, json_path: Path | None) -> None:
    """The common tail of a bench: each goal met or not, then the report as JSON where asked."""
    for name, met in report["goals"].items():
        print(f"goal {name}: {'met' if met else 'NOT met'}")
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {json_path}", file=sys.stderr)
