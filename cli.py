"""The `specrelay` command. Each subcommand lives in its own module with `add_arguments(parser)` and
`main(args) -> int`; modules keep heavy imports (torch, aiohttp) inside `main` so that `--help` stays fast."""

from __future__ import annotations

import argparse
import importlib
import sys

from specrelay import __version__
from specrelay.shared.errors import SpecrelayError

# name -> (module, one-line help). Add a command by adding a row.
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("specrelay.services.serve", "start every service in one process (the embedded default)"),
    "gateway": ("specrelay.services.gateway.service", "the OpenAI-compatible gateway alone (verifiers over --redis)"),
    "verifier": ("specrelay.services.verifier.cli", "the target-model verifier alone (over --redis)"),
    "drafter": ("specrelay.services.drafter.service", "the draft proposer alone (over --redis)"),
    "kvstore": ("specrelay.services.kvstore.service", "keep the shared Redis KV store within its capacity"),
    "toolcoord": ("specrelay.services.toolcoord.service", "run server-side tool calls from the bus (over --redis)"),
    "calibrate": ("specrelay.services.calibrate", "measure prefill and decode costs: the PTE profile (gamma, beta)"),
    "bench": ("specrelay.bench.cli", "benchmarks: ours and the baselines side by side (spec, bus, relay)"),
    "loadgen": ("specrelay.loadgen.cli", "drive an OpenAI-compatible endpoint and measure SLO attainment and goodput"),
    "models": ("specrelay.models.cli", "import a GGUF model; train and evaluate the small target + draft pair"),
    "chaos": ("specrelay.loadgen.chaos", "inject faults into the Redis topology and check that requests survive"),
    "kernels": ("specrelay.kernels.cli", "benchmark the Triton kernels against torch"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specrelay", description="specrelay: serving for LLM agent workloads")
    parser.add_argument("--version", action="version", version=f"specrelay {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        module.add_arguments(sub.add_parser(name, help=help_text, description=help_text))
        sub.choices[name].set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return int(args._module.main(args) or 0)
    except SpecrelayError as e:
        print(f"specrelay {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
