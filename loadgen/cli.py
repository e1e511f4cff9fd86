"""`specrelay loadgen run|report|capacity|sweep`. aiohttp, numpy and matplotlib are imported only inside the handlers."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from specrelay.loadgen.workloads import WORKLOADS
from specrelay.shared.errors import ConfigError
from specrelay.shared.slo import format_slos, parse_slo_specs

DEFAULT_CAPACITY_DURATION_S = 180.0  # minutes, not seconds: a queue that grows slowly needs time to show


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _seconds(text: str) -> float:
    """`30`, `30s` or `1500ms`; a bare number is seconds here (unlike SLO targets, which are ms)."""
    t = text.strip()
    try:
        value = float(t[:-2]) / 1000.0 if t.endswith("ms") else float(t[:-1] if t.endswith("s") else t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration (e.g. 30, 30s, 1500ms)") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _load_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workload", choices=WORKLOADS, default="mixed")
    bound = p.add_mutually_exclusive_group()
    bound.add_argument("--num", type=int, help="trajectories to run (default 100)")
    bound.add_argument("--duration", type=_seconds, metavar="S", help="start trajectories for S seconds (30, 30s, 1500ms)")
    p.add_argument("--slo", action="append", metavar="SPEC",
                   help="targets, e.g. ttft=500ms,tpot=50ms,e2e=20s (all classes) or interactive:ttft=300 "
                        "(one class); repeatable; bare numbers are ms")
    p.add_argument("--burstiness", type=_positive_float, default=1.0,
                   help="gamma shape of arrival gaps: 1 = Poisson, < 1 burstier")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", help="model name to request (default: the first one /v1/models lists)")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="bearer token (default $OPENAI_API_KEY)")
    p.add_argument("--slo-in-body", action="store_true",
                   help="also send slo_class/deadline_ms in the JSON body (X-SLO-Class/X-Deadline-Ms always go)")
    p.add_argument("--request-timeout", type=_positive_float, default=300.0, metavar="S")
    p.add_argument("--tool-pause-scale", type=float, default=1.0, help="multiply simulated tool pauses")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--no-progress", action="store_true", help="no progress bar (it is off anyway off a terminal)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="loadgen_command", metavar="SUBCOMMAND", required=True)

    run = sub.add_parser("run", help="drive an endpoint with one workload and write JSONL records")
    run.add_argument("--endpoint", required=True, help="the server's URL, e.g. http://127.0.0.1:8000")
    load = run.add_mutually_exclusive_group()
    load.add_argument("--rate", type=_positive_float, help="open loop: trajectories per second")
    load.add_argument("--concurrency", type=int, help="closed loop: workers running trajectories back to back")
    run.add_argument("--out", metavar="FILE", help="JSONL records: a run header, one line per request and trajectory")
    run.add_argument("--label", default="", help="the run's name in reports (e.g. the server policy)")
    _load_options(run)
    run.set_defaults(_handler=_run)

    report = sub.add_parser("report", help="compare runs side by side; --plot draws CDFs and goodput against rate")
    report.add_argument("files", nargs="+", metavar="FILE")
    report.add_argument("--plot", metavar="PNG")
    report.set_defaults(_handler=_report)

    cap = sub.add_parser("capacity", help="the highest open-loop rate whose completions keep up and whose queue "
                                          "does not grow (rates rise, then bisect)")
    cap.add_argument("--endpoint", help="the server's URL, e.g. http://127.0.0.1:8000")
    cap.add_argument("--server-cmd", help='start the server first, e.g. "specrelay serve --port {port} '
                                          '--schedule {schedule}"')
    cap.add_argument("--schedule", default="fcfs", help="the {schedule} of --server-cmd (default fcfs)")
    cap.add_argument("--port", type=int, help="the {port} of --server-cmd (default: a free port)")
    cap.add_argument("--server-ready-timeout", type=_positive_float, default=600.0, metavar="S")
    cap.add_argument("--out-dir", required=True, help="capacity.json and one JSONL of records per rate")
    _search_options(cap, "")
    _load_options(cap)
    cap.set_defaults(_handler=_capacity)

    sweep = sub.add_parser("sweep", help="goodput against rate (0.5x..2x of measured capacity) for server policies")
    sweep.add_argument("--endpoint", action="append", default=[], help="a running server; repeat, one per policy")
    sweep.add_argument("--schedule-label", action="append", default=[], help="the policy name of each --endpoint")
    sweep.add_argument("--server-cmd", help='start the server per policy, e.g. "specrelay serve --port {port} '
                                            '--schedule {schedule}"')
    sweep.add_argument("--schedules", default="fcfs,slo", help="policies for --server-cmd (default fcfs,slo)")
    sweep.add_argument("--port", type=int, help="the {port} of --server-cmd (default: a free port)")
    sweep.add_argument("--factors", default="0.5,0.75,1,1.25,1.5,2", help="rates as multiples of capacity")
    sweep.add_argument("--capacity", type=_positive_float, help="trajectories/s; skips the capacity measurement")
    sweep.add_argument("--capacity-duration", type=_seconds, default=DEFAULT_CAPACITY_DURATION_S, metavar="S",
                       help="each capacity rate offers arrivals this long (default 180 s)")
    _search_options(sweep, "capacity-")
    sweep.add_argument("--server-ready-timeout", type=_positive_float, default=600.0, metavar="S")
    sweep.add_argument("--out-dir", required=True, help="sweep.json, sweep.png and one JSONL per point")
    _load_options(sweep)
    sweep.set_defaults(_handler=_sweep)


def _search_options(p: argparse.ArgumentParser, prefix: str) -> None:
    p.add_argument(f"--{prefix}start-rate", type=_positive_float, default=0.5,
                   help="trajectories/s of the first capacity run (default 0.5)")
    p.add_argument(f"--{prefix}growth", type=_positive_float, default=2.0,
                   help="rates rise (or fall) by this factor until the verdict changes (default 2)")
    p.add_argument(f"--{prefix}precision", type=_positive_float, default=0.1,
                   help="then bisect until failing/passing rate <= 1 + this (default 0.1)")
    p.add_argument(f"--{prefix}max-rates", type=int, default=10, help="capacity runs in all (default 10)")
    p.add_argument(f"--{prefix}drain", type=_seconds, default=30.0, metavar="S",
                   help="after each capacity run, in-flight trajectories get S to finish (default 30)")


def _search(args: argparse.Namespace, prefix: str, duration_s: float):
    from specrelay.loadgen.capacity import CapacitySearch

    get = lambda name: getattr(args, prefix + name)  # noqa: E731
    return CapacitySearch(start_rate=get("start_rate"), duration_s=duration_s, growth=get("growth"),
                          precision=get("precision"), max_rates=get("max_rates"), drain_s=get("drain"))


def main(args: argparse.Namespace) -> int:
    return args._handler(args)


def _base_config(args: argparse.Namespace, endpoint: str):
    from specrelay.loadgen.runner import RunConfig

    return RunConfig(
        endpoint=endpoint, workload=args.workload, label=getattr(args, "label", ""), model=args.model,
        rate=getattr(args, "rate", None), burstiness=args.burstiness, concurrency=getattr(args, "concurrency", None),
        num=args.num, duration_s=args.duration, slos=parse_slo_specs(args.slo), seed=args.seed,
        out=getattr(args, "out", None), api_key=args.api_key, slo_in_body=args.slo_in_body,
        request_timeout_s=args.request_timeout, tool_pause_scale=args.tool_pause_scale,
        temperature=args.temperature, progress=False if args.no_progress else None,
    )


def _run(args: argparse.Namespace) -> int:
    from specrelay.loadgen.client import api_base
    from specrelay.loadgen.report import LoadedRun, format_table
    from specrelay.loadgen.runner import run_load

    api_base(args.endpoint)  # a malformed URL fails before anything starts
    cfg = _base_config(args, args.endpoint)
    print(f"loadgen: {cfg.workload} against {cfg.endpoint}, SLOs {format_slos(cfg.slos)}", file=sys.stderr)
    result = asyncio.run(run_load(cfg))
    data = result.data
    print(format_table([LoadedRun(data.run.label if data.run else cfg.workload, data, result.summary)]))
    if result.num_cancelled:
        print(f"{result.num_cancelled} trajectories were still running at the drain timeout (not recorded)")
    if cfg.out:
        print(f"records: {cfg.out}")
    if result.summary.num_requests and result.summary.num_failed == result.summary.num_requests:
        print("loadgen: every request failed (see the errors rows)", file=sys.stderr)
        return 1
    return 0


def _report(args: argparse.Namespace) -> int:
    from specrelay.loadgen.report import format_table, load_runs, plot_runs

    runs = load_runs(args.files)
    print(format_table(runs))
    if args.plot:
        plot_runs(runs, args.plot)
        print(f"plot: {args.plot}")
    return 0


def _capacity(args: argparse.Namespace) -> int:
    from pathlib import Path

    from specrelay.loadgen.capacity import format_curve
    from specrelay.loadgen.capacity_run import capacity_report, measure_capacity, write_report
    from specrelay.loadgen.client import api_base
    from specrelay.loadgen.server_cmd import serving

    if bool(args.server_cmd) == bool(args.endpoint):
        raise ConfigError("capacity needs --endpoint (a running server) or --server-cmd, one of the two")
    if args.num is not None:
        raise ConfigError("capacity offers each rate for --duration seconds (default 180), not --num trajectories")
    if args.endpoint:
        api_base(args.endpoint)
    search = _search(args, "", args.duration or DEFAULT_CAPACITY_DURATION_S)
    base = _base_config(args, args.endpoint or "http://127.0.0.1")
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    log = lambda line: print(line, file=sys.stderr)  # noqa: E731

    async def measure():
        async with serving(args.schedule, args.endpoint, args.server_cmd, out_dir=args.out_dir, port=args.port,
                           ready_timeout_s=args.server_ready_timeout) as endpoint:
            return await measure_capacity(base, search, endpoint, args.out_dir, log)

    result = asyncio.run(measure())
    path = write_report(capacity_report(result, base, search), args.out_dir)
    print(format_curve(result))
    print(f"capacity: {path}")
    return 0 if result.capacity is not None else 1


def _sweep(args: argparse.Namespace) -> int:
    from specrelay.loadgen.sweep import SweepConfig, Target, run_sweep

    if args.server_cmd and args.endpoint:
        raise ConfigError("give --endpoint (running servers) or --server-cmd, not both")
    if args.server_cmd:
        targets = [Target(label=s.strip(), server_cmd=args.server_cmd) for s in args.schedules.split(",") if s.strip()]
    else:
        labels = args.schedule_label or ([] if len(args.endpoint) != 1 else ["server"])
        if len(labels) != len(args.endpoint):
            raise ConfigError(f"{len(args.endpoint)} --endpoint but {len(labels)} --schedule-label: give one each")
        targets = [Target(label=lab, endpoint=url) for lab, url in zip(labels, args.endpoint)]
    try:
        factors = tuple(float(f) for f in args.factors.split(","))
    except ValueError:
        raise ConfigError(f"--factors {args.factors!r}: expected numbers separated by commas") from None
    cfg = SweepConfig(
        targets=targets, base=_base_config(args, args.endpoint[0] if args.endpoint else "http://127.0.0.1"),
        out_dir=args.out_dir, factors=factors, capacity=args.capacity,
        capacity_search=None if args.capacity else _search(args, "capacity_", args.capacity_duration),
        server_ready_timeout_s=args.server_ready_timeout, port=args.port,
    )
    report = asyncio.run(run_sweep(cfg, log=lambda line: print(line, file=sys.stderr)))
    comparison = report["comparison"]
    if comparison:
        for label, c in comparison.items():
            if isinstance(c, dict) and "min_ratio_under_overload" in c:
                ratio = c["min_ratio_under_overload"]
                print(f"{label} vs {comparison['baseline']}: token goodput ratio under overload "
                      f"min {'-' if ratio is None else f'{ratio:.2f}x'}; starved: {c['starved'] or 'none'}")
    print(f"sweep: {args.out_dir}/sweep.json, {args.out_dir}/sweep.png")
    return 0
