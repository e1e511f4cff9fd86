"""`specrelay loadgen report`: runs side by side (one column per run, one row per metric) and plots (latency
CDFs, goodput against offered rate). matplotlib is imported only when a plot is asked for."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from specrelay.loadgen.metrics import RunSummary, summarize
from specrelay.loadgen.records import RunData, read_records
from specrelay.shared.slo import SLO_CLASSES


@dataclass
class LoadedRun:
    name: str  # column header: the run's label, or the file name when labels repeat
    data: RunData
    summary: RunSummary

    @property
    def offered(self) -> str:
        run = self.data.run
        if run is None:
            return "?"
        if run.rate is not None:
            return f"{run.rate:g}/s {run.arrival}"
        return f"C={run.concurrency}"


def load_runs(paths: list[str]) -> list[LoadedRun]:
    datas = [read_records(p) for p in paths]
    labels = [d.run.label if d.run else Path(p).stem for d, p in zip(datas, paths)]
    # Repeated labels (a sweep's points share one) would make columns ambiguous: name them by file instead.
    names = [lab if labels.count(lab) == 1 else Path(p).stem for lab, p in zip(labels, paths)]
    return [LoadedRun(n, d, summarize(d)) for n, d in zip(names, datas)]


def _num(x: float, digits: int = 1) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:,.{digits}f}"


def _pct(x: float) -> str:
    return "-" if math.isnan(x) else f"{100 * x:.1f}%"


def slo_text(slos: dict[str, dict[str, float]]) -> str:
    """`interactive ttft<=1000 tpot<=100, deadline e2e<=30000` (ms); classes without targets are left out."""
    parts = [f"{cls} " + " ".join(f"{k}<={v:g}" for k, v in targets.items())
             for cls, targets in slos.items() if targets]
    return ", ".join(parts) or "none"


def table_rows(run: LoadedRun) -> list[tuple[str, str]]:
    s = run.summary
    rows = [
        ("workload", run.data.run.workload if run.data.run else "?"),
        ("offered load", run.offered),
        ("SLO targets", slo_text(run.data.run.slos) if run.data.run else "?"),
        ("duration s", _num(s.duration_s)),
        ("trajectories", str(s.num_trajectories)),
        ("requests", str(s.num_requests)),
        ("failed requests", str(s.num_failed)),
        ("throughput tok/s", _num(s.output_throughput)),
        ("throughput req/s", _num(s.request_throughput, 2)),
        ("request goodput req/s", _num(s.request_goodput, 2)),
        ("token goodput tok/s", _num(s.token_goodput)),
        ("SLO attainment (requests)", _pct(s.attainment)),
        ("SLO attainment (trajectories)", _pct(s.trajectory_attainment)),
    ]
    for name, stats in (("TTFT", s.ttft), ("TPOT", s.tpot), ("ITL", s.itl), ("E2E", s.e2e)):
        rows.append((f"{name} p50/p90/p99 ms", f"{_num(stats.p50)} / {_num(stats.p90)} / {_num(stats.p99)}"))
    for cls in SLO_CLASSES:
        c = s.per_class.get(cls)
        if c is not None:
            rows.append((f"{cls}: attainment req/traj", f"{_pct(c.attainment)} / {_pct(c.trajectory_attainment)}"))
            rows.append((f"{cls}: token goodput tok/s", _num(c.token_goodput)))
    if s.pte is not None:
        rows.append(("PTE per trajectory mean/p90", f"{_num(s.pte.mean)} / {_num(s.pte.p90)}"))
    for key, mean in s.pte_detail_mean.items():
        if key != "total":
            rows.append((f"PTE {key} mean", _num(mean)))
    for kind, count in s.errors.items():
        rows.append((f"errors: {kind}", str(count)))
    return rows


def _row_order(metric: str) -> float:
    cls = metric.split(":", 1)[0]
    if cls in SLO_CLASSES:
        return 1 + SLO_CLASSES.index(cls) / 10
    return 2 if metric.startswith("PTE") else 3 if metric.startswith("errors:") else 0


def format_table(runs: list[LoadedRun]) -> str:
    """Metrics down, runs across; rows a run lacks (a class it never saw, an error it never had) show `-`."""
    columns = [dict(table_rows(r)) for r in runs]
    metric_names: list[str] = []
    for r in runs:
        metric_names += [m for m, _ in table_rows(r) if m not in metric_names]
    metric_names.sort(key=_row_order)  # stable: runs that saw different classes or errors still line up
    header = ["metric"] + [r.name for r in runs]
    body = [[m] + [col.get(m, "-") for col in columns] for m in metric_names]
    widths = [max(len(row[i]) for row in [header] + body) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in [header] + body]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cdf(ax, values: list[float], label: str) -> None:
    xs = sorted(values)
    if xs:
        ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], label=label)


def plot_runs(runs: list[LoadedRun], path: str) -> None:
    """Latency CDFs of every run, and token goodput against offered rate, one line per label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    panels = (("TTFT", "ttft_ms"), ("TPOT", "tpot_ms"), ("E2E", "e2e_ms"))
    for ax, (title, attr) in zip(axes.flat, panels):
        for run in runs:
            _cdf(ax, [getattr(r, attr) for r in run.data.requests if r.ok and getattr(r, attr) is not None],
                 run.name)
        ax.set_xscale("log")
        ax.set_xlabel(f"{title} (ms)")
        ax.set_ylabel("fraction of requests")
        ax.set_title(f"{title} CDF")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    ax = axes.flat[3]
    series: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for run in runs:
        if run.data.run is not None and run.data.run.rate is not None:
            series[run.data.run.label].append((run.data.run.rate, run.summary.token_goodput))
    for label, points in sorted(series.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    ax.set_xlabel("offered rate (trajectories/s)")
    ax.set_ylabel("token goodput (tok/s)")
    ax.set_title("goodput against rate")
    ax.grid(alpha=0.3)
    if series:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
