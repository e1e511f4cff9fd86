"""`specrelay loadgen sweep`: goodput against offered rate, for two (or more) server policies on one workload.

1. Capacity, measured open-loop on the first target (capacity.py: the highest Poisson rate whose completions keep
   up with its arrivals and whose in-flight count does not grow over the run), or given with `--capacity`.
2. For each target and each factor f in `--factors` (default 0.5x .. 2x): an open-loop run at f x capacity, the
   same seeded arrivals and tasks for every target, so the policies see identical traffic.
3. JSON (every point, every class, the capacity curve) and a PNG (token goodput against rate; per-class attainment
   against rate).

Targets are either running endpoints (`--endpoint URL --schedule-label NAME`, repeated) or one server command
restarted per policy: `--server-cmd "specrelay serve --port {port} --schedule {schedule}" --schedules fcfs,slo`
(server_cmd.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from specrelay.loadgen.capacity import CapacitySearch, format_curve
from specrelay.loadgen.capacity_run import capacity_report, json_clean, measure_capacity
from specrelay.loadgen.client import EndpointError
from specrelay.loadgen.metrics import percentile
from specrelay.loadgen.records import RequestRecord
from specrelay.loadgen.runner import RunConfig, RunResult, run_load
from specrelay.loadgen.server_cmd import serving
from specrelay.shared.errors import ConfigError

DEFAULT_FACTORS = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0)


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
    capacity: float | None = None  # trajectories/s; None: measure it with `capacity_search`
    capacity_search: CapacitySearch | None = None
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
        if self.capacity is not None and not self.capacity > 0:
            raise ConfigError(f"--capacity must be positive, got {self.capacity:g}")
        if self.capacity is None and self.capacity_search is None:
            raise ConfigError("sweep needs --capacity or a capacity search to measure it")


def point_summary(factor: float, rate: float, result: RunResult, records: str) -> dict[str, Any]:
    s = result.summary
    by_class: dict[str, list[RequestRecord]] = {}
    for r in result.data.requests:
        by_class.setdefault(r.slo_class, []).append(r)
    return {
        "factor": factor, "rate": rate, "records": records,
        "token_goodput": s.token_goodput, "request_goodput": s.request_goodput,
        "output_throughput": s.output_throughput, "attainment": s.attainment,
        "trajectory_attainment": s.trajectory_attainment, "num_requests": s.num_requests,
        "num_failed": s.num_failed, "num_trajectories": s.num_trajectories, "duration_s": s.duration_s,
        **latencies(result.data.requests),
        "per_class": {cls: {"attainment": c.attainment, "trajectory_attainment": c.trajectory_attainment,
                            "token_goodput": c.token_goodput, "num_trajectories": c.num_trajectories,
                            **latencies(by_class.get(cls, []))}
                      for cls, c in s.per_class.items()},
        "starved_classes": s.starved_classes(),
    }


def latencies(requests: list[RequestRecord]) -> dict[str, float]:
    """p50/p99 of TTFT, TPOT and E2E over the successful requests (metrics.py's definitions)."""
    ok = [r for r in requests if r.ok]
    out = {}
    for name, values in (("ttft", [r.ttft_ms for r in ok]), ("tpot", [r.tpot_ms for r in ok]),
                         ("e2e", [r.e2e_ms for r in ok])):
        known = [v for v in values if v is not None]
        out[f"{name}_p50_ms"], out[f"{name}_p99_ms"] = percentile(known, 50), percentile(known, 99)
    return out


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


async def run_sweep(cfg: SweepConfig, log=print) -> dict[str, Any]:
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    capacity = cfg.capacity
    measured: dict[str, Any] | None = None
    policies: dict[str, list[dict[str, Any]]] = {}
    for target in cfg.targets:
        async with serving(target.label, target.endpoint, target.server_cmd, out_dir=cfg.out_dir, port=cfg.port,
                           ready_timeout_s=cfg.server_ready_timeout_s) as endpoint:
            if capacity is None:
                assert cfg.capacity_search is not None  # __post_init__
                found = await measure_capacity(cfg.base, cfg.capacity_search, endpoint, cfg.out_dir, log)
                measured = capacity_report(found, cfg.base, cfg.capacity_search)
                log(format_curve(found))
                if found.capacity is None:
                    raise EndpointError(f"capacity on {target.label}: no rate passed (lowest tried "
                                        f"{min(v.rate for v in found.curve):.4g}/s)")
                capacity = found.capacity
            points = []
            for factor in cfg.factors:
                rate = factor * capacity
                records = f"{target.label}-{factor:g}x.jsonl"  # inside out_dir: no machine path in the JSON
                run_cfg = replace(cfg.base, endpoint=endpoint, rate=rate, concurrency=None,
                                  label=target.label, out=str(Path(cfg.out_dir) / records))
                result = await run_load(run_cfg)
                points.append(point_summary(factor, rate, result, records))
                log(f"{target.label} {factor:g}x ({rate:.3f}/s): token goodput {result.summary.token_goodput:.1f} "
                    f"tok/s, attainment {100 * result.summary.attainment:.1f}%, "
                    f"{result.summary.num_failed} failed")
            policies[target.label] = points
    report = {
        "workload": cfg.base.workload, "seed": cfg.base.seed,
        "capacity_trajectories_per_s": capacity, "capacity_measured_on": cfg.labels[0] if cfg.capacity is None
        else "given", "capacity": measured, "factors": list(cfg.factors),
        "slos": {cls: slo.as_dict() for cls, slo in cfg.base.slos.items()},
        "policies": policies, "comparison": compare(policies),
    }
    report = json_clean(report)
    (Path(cfg.out_dir) / "sweep.json").write_text(json.dumps(report, indent=2, allow_nan=False))
    plot_sweep(report, str(Path(cfg.out_dir) / "sweep.png"))
    return report


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
