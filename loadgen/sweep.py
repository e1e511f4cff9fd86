"""`specrelay loadgen sweep`: goodput against offered rate, for two (or more) server policies on one workload.

1. Capacity: closed-loop runs against the first target, `--capacity-concurrency` workers back to back, doubled
   while throughput still grows by 10% (up to `--capacity-max-concurrency`); capacity is the most trajectories
   per second any probe completed.
2. For each target and each factor f in `--factors` (default 0.5x .. 2x): an open-loop run at f x capacity, the
   same seeded arrivals and tasks for every target, so the policies see identical traffic.
3. JSON (every point, every class) and a PNG (token goodput against rate; per-class attainment against rate).

Targets are either running endpoints (`--endpoint URL --schedule-label NAME`, repeated) or one server command
restarted per policy: `--server-cmd "specrelay serve --port {port} --schedule {schedule}" --schedules fcfs,slo`,
where `{schedule}` and `{port}` are filled in, the loadgen waits for /v1/models, and stops the server (SIGTERM to
its process group) when that policy's points are done.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import signal
import socket
import subprocess
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp

from specrelay.loadgen.client import EndpointError, discover_model
from specrelay.loadgen.runner import RunConfig, RunResult, run_load
from specrelay.shared.errors import ConfigError

DEFAULT_FACTORS = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0)
CAPACITY_GAIN = 1.1  # doubling the workers must add 10% throughput for the probe to go on


@dataclass
class Target:
    label: str  # the policy's name in the JSON and the plot (fcfs, slo)
    endpoint: str | None = None  # a running server ...
    server_cmd: str | None = None  # ... or a command template started for this target


@dataclass
class SweepConfig:
    targets: list[Target]
    base: RunConfig  # workload, SLOs, seed, per-point bound (num or duration), timeouts; endpoint/rate ignored
    out_dir: str
    factors: tuple[float, ...] = DEFAULT_FACTORS
    capacity: float | None = None  # trajectories/s; None: measure it
    capacity_concurrency: int = 8  # the first probe's workers; doubled while throughput still grows
    capacity_max_concurrency: int = 64
    capacity_num: int | None = None  # trajectories for the capacity run; None: the points' bound
    server_ready_timeout_s: float = 600.0
    port: int | None = None  # for {port}; None: a free port
    labels: list[str] = field(init=False)

    def __post_init__(self) -> None:
        if not self.targets:
            raise ConfigError("sweep needs --endpoint (one per policy) or --server-cmd with --schedules")
        self.labels = [t.label for t in self.targets]
        if len(set(self.labels)) != len(self.labels):
            raise ConfigError(f"sweep labels must differ, got {self.labels}")
        if not self.factors or any(not f > 0 for f in self.factors):
            raise ConfigError(f"--factors must be positive numbers, got {list(self.factors)}")
        if not 1 <= self.capacity_concurrency <= self.capacity_max_concurrency:
            raise ConfigError(f"capacity concurrency must be 1 <= {self.capacity_concurrency} <= "
                              f"{self.capacity_max_concurrency} (--capacity-max-concurrency)")
        if self.capacity is not None and not self.capacity > 0:
            raise ConfigError(f"--capacity must be positive, got {self.capacity:g}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@asynccontextmanager
async def serving(target: Target, cfg: SweepConfig) -> AsyncIterator[str]:
    """Yield the target's endpoint; for a server command, start it first and stop it after."""
    if target.server_cmd is None:
        yield target.endpoint or ""
        return
    port = cfg.port or free_port()
    argv = shlex.split(target.server_cmd.format(schedule=target.label, port=port))
    log_path = Path(cfg.out_dir) / f"server-{target.label}.log"
    endpoint = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as log:
        try:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as e:
            raise ConfigError(f"--server-cmd {argv[0]!r} cannot start: {e.strerror or e}") from None
        try:
            await _wait_ready(proc, endpoint, cfg.server_ready_timeout_s, log_path)
            yield endpoint
        finally:
            _stop(proc)


async def _wait_ready(proc: subprocess.Popen, endpoint: str, timeout_s: float, log_path: Path) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        while True:
            if proc.poll() is not None:
                tail = log_path.read_text(errors="replace")[-500:]
                raise EndpointError(f"server command exited with status {proc.returncode} before serving:\n{tail}")
            try:
                await discover_model(session, endpoint, timeout_s=2.0)
                return
            except EndpointError:
                if time.monotonic() > deadline:
                    raise EndpointError(f"server at {endpoint} not ready after {timeout_s:g}s (log: {log_path})")
                await asyncio.sleep(0.2)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)  # the group we created: the server and anything it spawned
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def point_summary(factor: float, rate: float, result: RunResult, records: str) -> dict[str, Any]:
    s = result.summary
    return {
        "factor": factor, "rate": rate, "records": records,
        "token_goodput": s.token_goodput, "request_goodput": s.request_goodput,
        "output_throughput": s.output_throughput, "attainment": s.attainment,
        "trajectory_attainment": s.trajectory_attainment, "num_requests": s.num_requests,
        "num_failed": s.num_failed, "num_trajectories": s.num_trajectories, "duration_s": s.duration_s,
        "ttft_p99_ms": s.ttft.p99, "e2e_p99_ms": s.e2e.p99,
        "per_class": {cls: {"attainment": c.attainment, "trajectory_attainment": c.trajectory_attainment,
                            "token_goodput": c.token_goodput, "num_trajectories": c.num_trajectories}
                      for cls, c in s.per_class.items()},
        "starved_classes": s.starved_classes(),
    }


def compare(policies: dict[str, list[dict[str, Any]]]) -> dict[str, Any] | None:
    """The first policy is the baseline; every other is compared with it on the overload points (factor > 1)."""
    labels = list(policies)
    if len(labels) < 2:
        return None
    base = labels[0]
    out: dict[str, Any] = {"baseline": base, "overload_factors": [p["factor"] for p in policies[base]
                                                                   if p["factor"] > 1.0]}
    for cand in labels[1:]:
        ratios = {}
        for pb, pc in zip(policies[base], policies[cand]):
            if pb["factor"] > 1.0:
                ratios[str(pb["factor"])] = pc["token_goodput"] / pb["token_goodput"] if pb["token_goodput"] else None
        known = [r for r in ratios.values() if r is not None]
        out[cand] = {
            "token_goodput_ratio": ratios,
            "min_ratio_under_overload": min(known) if known else None,
            "starved": {str(p["factor"]): p["starved_classes"] for p in policies[cand] if p["starved_classes"]},
        }
    return out


async def measure_capacity(cfg: SweepConfig, endpoint: str, log=print) -> tuple[float, list[dict[str, float]]]:
    """Closed-loop runs at doubling concurrency until throughput grows less than `CAPACITY_GAIN` (or the cap):
    with tool pauses in the workload, a few workers leave the server idle, so one level would understate it."""
    bound = ({"num": cfg.capacity_num, "duration_s": None} if cfg.capacity_num
             else {"num": cfg.base.num, "duration_s": cfg.base.duration_s})
    runs: list[dict[str, float]] = []
    concurrency = cfg.capacity_concurrency
    while True:
        run_cfg = replace(cfg.base, endpoint=endpoint, rate=None, concurrency=concurrency, label="capacity",
                          out=str(Path(cfg.out_dir) / f"capacity-c{concurrency}.jsonl"), **bound)
        s = (await run_load(run_cfg)).summary
        if s.num_trajectories == 0 or s.duration_s <= 0:
            raise EndpointError(f"capacity run at concurrency {concurrency} completed no trajectory")
        runs.append({"concurrency": concurrency, "trajectories_per_s": s.num_trajectories / s.duration_s,
                     "num_failed": s.num_failed})
        log(f"capacity probe: concurrency {concurrency}: {runs[-1]['trajectories_per_s']:.3f} trajectories/s")
        grew = len(runs) == 1 or runs[-1]["trajectories_per_s"] >= CAPACITY_GAIN * runs[-2]["trajectories_per_s"]
        if not grew or concurrency * 2 > cfg.capacity_max_concurrency:
            break
        concurrency *= 2
    return max(r["trajectories_per_s"] for r in runs), runs


async def run_sweep(cfg: SweepConfig, log=print) -> dict[str, Any]:
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    capacity = cfg.capacity
    capacity_runs: list[dict[str, float]] = []
    policies: dict[str, list[dict[str, Any]]] = {}
    for target in cfg.targets:
        async with serving(target, cfg) as endpoint:
            if capacity is None:
                capacity, capacity_runs = await measure_capacity(cfg, endpoint, log)
                log(f"capacity on {target.label}: {capacity:.3f} trajectories/s")
            points = []
            for factor in cfg.factors:
                rate = factor * capacity
                records = str(Path(cfg.out_dir) / f"{target.label}-{factor:g}x.jsonl")
                run_cfg = replace(cfg.base, endpoint=endpoint, rate=rate, concurrency=None,
                                  label=target.label, out=records)
                result = await run_load(run_cfg)
                points.append(point_summary(factor, rate, result, records))
                log(f"{target.label} {factor:g}x ({rate:.3f}/s): token goodput {result.summary.token_goodput:.1f} "
                    f"tok/s, attainment {100 * result.summary.attainment:.1f}%, "
                    f"{result.summary.num_failed} failed")
            policies[target.label] = points
    report = {
        "workload": cfg.base.workload, "seed": cfg.base.seed,
        "capacity_trajectories_per_s": capacity, "capacity_measured_on": cfg.labels[0] if cfg.capacity is None
        else "given", "capacity_runs": capacity_runs, "factors": list(cfg.factors),
        "slos": {cls: slo.as_dict() for cls, slo in cfg.base.slos.items()},
        "policies": policies, "comparison": compare(policies),
    }
    report = _json_clean(report)
    (Path(cfg.out_dir) / "sweep.json").write_text(json.dumps(report, indent=2, allow_nan=False))
    plot_sweep(report, str(Path(cfg.out_dir) / "sweep.png"))
    return report


def _json_clean(x: Any) -> Any:
    """NaN (a metric with no sample) is not JSON: write null."""
    if isinstance(x, float) and x != x:
        return None
    if isinstance(x, dict):
        return {k: _json_clean(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_json_clean(v) for v in x]
    return x


def plot_sweep(report: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    styles = ["-", "--", ":", "-."]
    for i, (label, points) in enumerate(report["policies"].items()):
        rates = [p["rate"] for p in points]
        ax1.plot(rates, [p["token_goodput"] for p in points], styles[i % 4], marker="o", label=label)
        for cls in sorted({c for p in points for c in p["per_class"]}):
            ys = [_finite(p["per_class"].get(cls, {}).get("trajectory_attainment")) for p in points]
            ax2.plot(rates, ys, styles[i % 4], marker=".", label=f"{label} {cls}")
    ax1.set(xlabel="offered rate (trajectories/s)", ylabel="token goodput (tok/s)",
            title=f"{report['workload']}: goodput against rate")
    ax2.set(xlabel="offered rate (trajectories/s)", ylabel="SLO attainment (trajectories)",
            title="attainment per class", ylim=(-0.02, 1.02))
    for ax in (ax1, ax2):
        ax.axvline(report["capacity_trajectories_per_s"], color="grey", lw=0.8)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _finite(x: float | None) -> float:
    return float("nan") if x is None else x
