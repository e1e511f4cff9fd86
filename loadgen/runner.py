"""One load run: offer trajectories open-loop (Poisson / gamma arrivals) or closed-loop (C workers back to back),
bounded by a count or a duration, write every record as it finishes, and summarise."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import aiohttp

from specrelay.loadgen.arrivals import ArrivalProcess
from specrelay.loadgen.client import OpenAIClient, discover_model
from specrelay.loadgen.metrics import RunSummary, summarize
from specrelay.loadgen.progress import ProgressBar
from specrelay.loadgen.records import RecordWriter, RequestRecord, RunData, RunRecord, TrajectoryRecord
from specrelay.loadgen.trajectories import PlayContext, play
from specrelay.loadgen.workloads import WORKLOADS, make_task
from specrelay.shared.errors import ConfigError
from specrelay.shared.slo import DEFAULT_SLOS, Slo

DEFAULT_NUM = 100


@dataclass
class RunConfig:
    endpoint: str
    workload: str
    label: str = ""
    model: str | None = None  # None: the first model the endpoint lists
    rate: float | None = None  # open loop: trajectories per second
    burstiness: float = 1.0  # gamma shape; 1 = Poisson
    concurrency: int | None = None  # closed loop: workers
    num: int | None = None  # trajectories to run ...
    duration_s: float | None = None  # ... or seconds during which new ones start
    slos: dict[str, Slo] = field(default_factory=lambda: dict(DEFAULT_SLOS))
    seed: int = 0
    out: str | None = None
    api_key: str | None = None
    slo_in_body: bool = False  # also send slo_class / deadline_ms in the body (the headers always go)
    request_timeout_s: float = 300.0
    drain_timeout_s: float | None = None  # after the last start, how long in-flight work may finish; None: timeout
    tool_pause_scale: float = 1.0
    temperature: float = 0.0
    progress: bool | None = None  # None: when stderr is a terminal

    def __post_init__(self) -> None:
        if self.workload not in WORKLOADS:
            raise ConfigError(f"unknown workload {self.workload!r} (one of {', '.join(WORKLOADS)})")
        if self.rate is not None and self.concurrency is not None:
            raise ConfigError("give --rate (open loop) or --concurrency (closed loop), not both")
        if self.rate is None and self.concurrency is None:
            self.concurrency = 1
        if self.concurrency is not None and self.concurrency < 1:
            raise ConfigError(f"--concurrency must be at least 1, got {self.concurrency}")
        if self.rate is not None:
            ArrivalProcess(self.rate, self.burstiness)  # validates
        if self.num is not None and self.duration_s is not None:
            raise ConfigError("give --num or --duration, not both")
        if self.num is None and self.duration_s is None:
            self.num = DEFAULT_NUM
        if self.num is not None and self.num < 1:
            raise ConfigError(f"--num must be at least 1, got {self.num}")
        if self.duration_s is not None and not self.duration_s > 0:
            raise ConfigError(f"--duration must be positive, got {self.duration_s:g}")
        if not self.request_timeout_s > 0:
            raise ConfigError(f"--request-timeout must be positive, got {self.request_timeout_s:g}")

    @property
    def arrival(self) -> str:
        return "closed" if self.rate is None else ArrivalProcess(self.rate, self.burstiness).name


@dataclass
class RunResult:
    data: RunData
    summary: RunSummary
    num_cancelled: int  # trajectories still running when the drain timeout passed (no trajectory record)
    # When every trajectory started (seconds since the run began), the cancelled ones included: with the
    # trajectory records' finishes, this gives the number in flight at any instant (capacity.py).
    started_s: list[float] = field(default_factory=list)


class _Run:
    def __init__(self, cfg: RunConfig, client: OpenAIClient, writer: RecordWriter):
        self.cfg, self.writer = cfg, writer
        self.requests: list[RequestRecord] = []
        self.trajectories: list[TrajectoryRecord] = []
        self.started_s: list[float] = []
        self.num_errors = 0
        self.start = time.perf_counter()
        self.ctx = PlayContext(client=client, run_start=self.start, on_request=self.on_request,
                               tool_pause_scale=cfg.tool_pause_scale, temperature=cfg.temperature)
        total, unit = (cfg.num, "trajectories") if cfg.num is not None else (cfg.duration_s, "s")
        self.bar = ProgressBar(total or 0, unit, enabled=cfg.progress)

    def on_request(self, record: RequestRecord) -> None:
        self.requests.append(record)
        self.num_errors += not record.ok
        self.writer.write(record)
        self.draw()

    def draw(self, force: bool = False) -> None:
        elapsed = time.perf_counter() - self.start
        done = len(self.trajectories) if self.cfg.num is not None else min(elapsed, self.cfg.duration_s or 0)
        self.bar.update(done, requests=len(self.requests), errors=self.num_errors, force=force)

    async def one(self, index: int, start: float | None = None) -> None:
        self.started_s.append((start if start is not None else time.perf_counter()) - self.start)
        record = await play(make_task(self.cfg.workload, index, self.cfg.seed, self.cfg.slos), self.ctx, start)
        self.trajectories.append(record)
        self.writer.write(record)
        self.draw()

    def accepting(self, index: int, now: float) -> bool:
        if self.cfg.num is not None:
            return index < self.cfg.num
        return now - self.start < (self.cfg.duration_s or 0)

    async def open_loop(self) -> list[asyncio.Task]:
        arrivals = ArrivalProcess(self.cfg.rate or 0.0, self.cfg.burstiness)
        times = (arrivals.schedule(self.cfg.num, self.cfg.seed) if self.cfg.num is not None
                 else arrivals.schedule_until(self.cfg.duration_s or 0.0, self.cfg.seed))
        tasks = []
        for index, at in enumerate(times):
            delay = self.start + float(at) - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(self.one(index)))
        return tasks

    async def closed_loop(self) -> list[asyncio.Task]:
        next_index = 0

        async def worker() -> None:
            nonlocal next_index
            # the instant that passed the duration check is the trajectory's start: none starts after the bound
            while self.accepting(next_index, now := time.perf_counter()):
                index, next_index = next_index, next_index + 1
                await self.one(index, now)

        return [asyncio.create_task(worker()) for _ in range(self.cfg.concurrency or 1)]

    async def drive(self) -> int:
        issuing = self.open_loop() if self.cfg.rate is not None else self.closed_loop()
        tasks = await issuing
        if not tasks:
            return 0
        drain = self.cfg.drain_timeout_s if self.cfg.drain_timeout_s is not None else self.cfg.request_timeout_s
        if self.cfg.rate is None and self.cfg.duration_s is not None:
            drain += self.cfg.duration_s  # closed-loop workers only stop starting at the duration
        done, pending = await asyncio.wait(tasks, timeout=drain if self.cfg.duration_s is not None else None)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for task in done:
            task.result()  # a bug in the loadgen itself is not a server error: let it surface
        return len(pending)


async def run_load(cfg: RunConfig) -> RunResult:
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10.0)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
        models = await discover_model(session, cfg.endpoint, cfg.api_key)
        model = cfg.model or models[0]
        client = OpenAIClient(session, cfg.endpoint, model, api_key=cfg.api_key, slo_in_body=cfg.slo_in_body,
                              request_timeout_s=cfg.request_timeout_s)
        header = RunRecord(
            label=cfg.label or cfg.workload, endpoint=cfg.endpoint, model=model, workload=cfg.workload,
            arrival=cfg.arrival, rate=cfg.rate, burstiness=cfg.burstiness if cfg.rate is not None else None,
            concurrency=cfg.concurrency, seed=cfg.seed, started_at=time.time(),
            slos={cls: slo.as_dict() for cls, slo in cfg.slos.items()},
        )
        writer = RecordWriter(cfg.out)
        writer.write(header)
        run = _Run(cfg, client, writer)
        try:
            num_cancelled = await run.drive()
        finally:
            run.draw(force=True)
            run.bar.close()
            header.duration_s = time.perf_counter() - run.start
            header.num_requests, header.num_trajectories = len(run.requests), len(run.trajectories)
            writer.write(header)  # the last run line wins: it carries the measured duration
            writer.close()
    data = RunData(header, run.requests, run.trajectories)
    return RunResult(data, summarize(data), num_cancelled, run.started_s)
