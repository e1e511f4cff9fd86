"""`specrelay kernels bench --json FILE`: the kernels against torch, side by side, on this machine's GPU."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from specrelay.shared.errors import SpecrelayError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="kernels_command", metavar="SUBCOMMAND")
    bench = sub.add_parser("bench", help="time every kernel against its reference and the best torch baseline")
    bench.add_argument("--json", type=Path, metavar="FILE", help="also write the full report to FILE")
    bench.add_argument("--allow-cpu", action="store_true",
                       help="run tiny sizes without a GPU (checks the command; the numbers mean nothing)")  # fmt: skip
    bench.add_argument("--batches", default="1,8", help="requests per step for verify vs decode (default 1,8)")
    bench.add_argument("--context-len", type=int, default=1024, help="cached tokens per request for verify vs decode")
    bench.add_argument("--skip-model", action="store_true", help="kernels only, no 1B-model verify/decode step")
    parser.set_defaults(_parser=parser)


def main(args: argparse.Namespace) -> int:
    if args.kernels_command != "bench":
        args._parser.print_help()
        return 0
    import torch

    try:
        batches = tuple(int(b) for b in args.batches.split(","))
        assert batches and all(b > 0 for b in batches)
    except (ValueError, AssertionError):
        raise SpecrelayError(f"--batches takes positive integers separated by commas, got {args.batches!r}") from None
    if args.context_len < 1:
        raise SpecrelayError(f"--context-len must be at least 1, got {args.context_len}")
    if torch.cuda.is_available():
        device = torch.device("cuda")
    elif args.allow_cpu:
        device = torch.device("cpu")
    else:
        raise SpecrelayError("no CUDA device: this benchmark measures GPU kernels; "
                             "--allow-cpu runs tiny sizes only to check the command")  # fmt: skip
    try:
        import triton  # noqa: F401
    except ImportError:
        raise SpecrelayError("triton is not installed: pip install 'specrelay[gpu]'") from None

    from specrelay.kernels import bench, bench_model

    gpu = device.type == "cuda"
    sizes = bench.GPU_SIZES if gpu else bench.CPU_SIZES

    def model_run() -> dict:
        if args.skip_model:
            return {"skipped": "--skip-model"}
        return bench_model.run_model_bench(
            device, bench_model.LLAMA_1B if gpu else bench_model.TINY_LLAMA, batches if gpu else batches[:2],
            args.context_len if gpu else 8, 64 if gpu else 6, 16 if gpu else 4, sizes.warmup, sizes.iters,
            bench.time_ms,
        )  # fmt: skip

    report = bench.run_bench(device, sizes, model_run)
    print(bench.format_report(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0
