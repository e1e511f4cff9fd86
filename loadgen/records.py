"""What a run writes: one JSONL line per run header, per request and per trajectory (msgspec Structs, tagged by
`type`). Every metric in metrics.py is computed from these records alone, so a report can be redone from the file."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Union

import msgspec

from specrelay.shared.errors import SpecrelayError


class RunRecord(msgspec.Struct, tag="run", kw_only=True):
    """The header: how the load was offered, so reports can group and label runs."""

    label: str  # the run's name in tables and plots (e.g. the server policy: fcfs, slo)
    endpoint: str
    model: str
    workload: str
    arrival: str  # poisson | gamma | closed
    rate: float | None  # trajectories per second offered (open loop); None in closed loop
    burstiness: float | None  # gamma shape k; 1 = Poisson
    concurrency: int | None  # closed-loop workers
    seed: int
    slos: dict[str, dict[str, float]]  # class -> {ttft|tpot|e2e: ms}
    started_at: float  # unix seconds
    duration_s: float = 0.0  # first request sent -> last response finished
    num_requests: int = 0
    num_trajectories: int = 0


class RequestRecord(msgspec.Struct, tag="request", kw_only=True):
    """One streamed chat completion. Times are in ms; `start_s` is seconds since the run started."""

    request_id: str
    trajectory_id: str
    turn: int  # position within the trajectory (0 = first call)
    agent: str  # which role made the call (chat, agent, planner, worker-1, reviewer, researcher)
    workload: str
    slo_class: str
    start_s: float
    ok: bool  # HTTP 200 and a complete stream
    error: str | None = None
    http_status: int | None = None
    ttft_ms: float | None = None
    e2e_ms: float | None = None
    tpot_ms: float | None = None  # (e2e - ttft) / (completion_tokens - 1), as vLLM's benchmark defines it
    itl_ms: list[float] = []  # gaps between consecutive chunks that carried tokens
    prompt_tokens: int | None = None
    completion_tokens: int = 0
    usage_reported: bool = False  # False: completion_tokens counts chunks, not tokens
    finish_reason: str | None = None
    num_tool_calls: int = 0
    deadline_ms: float | None = None  # the deadline sent in X-Deadline-Ms, if any
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None
    slo_e2e_ms: float | None = None
    pte: float | None = None  # usage.pte (or usage.pte.total) when the server reports it
    pte_detail: dict[str, float] | None = None


class TrajectoryRecord(msgspec.Struct, tag="trajectory", kw_only=True):
    """One task: a chat turn, an agentic tool loop, a relay pipeline or a research call."""

    trajectory_id: str
    workload: str
    slo_class: str
    start_s: float
    e2e_ms: float
    num_requests: int
    num_failed: int
    num_tool_pauses: int = 0
    tool_pause_ms: float = 0.0
    completion_tokens: int = 0
    deadline_ms: float | None = None  # end-to-end budget of the whole trajectory (compound SLO), if any
    pte: float | None = None  # sum of the requests' usage.pte, when every request reported one
    # The sum of each usage.pte field every request reported (e.g. a full-eviction PTE beside ours).
    pte_detail: dict[str, float] | None = None


Record = Union[RunRecord, RequestRecord, TrajectoryRecord]

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Record)


def encode_line(record: Record) -> bytes:
    return _encoder.encode(record) + b"\n"


class RecordWriter:
    """Appends records to a JSONL file as they finish, so an interrupted run keeps what it measured."""

    def __init__(self, path: str | Path | None):
        self._file = open(path, "wb") if path else None

    def write(self, record: Record) -> None:
        if self._file is not None:
            self._file.write(encode_line(record))
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


class RunData(msgspec.Struct):
    run: RunRecord | None
    requests: list[RequestRecord]
    trajectories: list[TrajectoryRecord]


def split_records(records: Iterable[Record]) -> RunData:
    data = RunData(None, [], [])
    for rec in records:
        if isinstance(rec, RunRecord):
            data.run = rec
        elif isinstance(rec, RequestRecord):
            data.requests.append(rec)
        else:
            data.trajectories.append(rec)
    return data


def read_records(path: str | Path) -> RunData:
    """Read a run's JSONL; the last `run` line wins (the runner rewrites it with the final duration)."""
    try:
        lines = Path(path).read_bytes().splitlines()
    except OSError as e:
        raise SpecrelayError(f"cannot read {path}: {e.strerror or e}") from None
    records = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(_decoder.decode(line))
        except msgspec.DecodeError as e:
            raise SpecrelayError(f"{path}:{lineno}: not a loadgen record ({e})") from None
    return split_records(records)
