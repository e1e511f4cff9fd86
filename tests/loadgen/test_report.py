from specrelay.loadgen.records import RecordWriter, RequestRecord, RunRecord, TrajectoryRecord
from specrelay.loadgen.report import format_table, load_runs


def write_run(path, label, slo_class, *, ok=True, error=None):
    w = RecordWriter(path)
    w.write(RunRecord(label=label, endpoint="e", model="m", workload="chat", arrival="poisson", rate=2.0,
                      burstiness=1.0, concurrency=None, seed=0, slos={"interactive": {"ttft": 500.0}, "batch": {}},
                      started_at=0.0, duration_s=2.0))
    w.write(RequestRecord(request_id="r", trajectory_id="t", turn=0, agent="chat", workload="chat",
                          slo_class=slo_class, start_s=0.0, ok=ok, error=error, ttft_ms=100.0, e2e_ms=300.0,
                          completion_tokens=4 if ok else 0, slo_ttft_ms=500.0))
    w.write(TrajectoryRecord(trajectory_id="t", workload="chat", slo_class=slo_class, start_s=0.0, e2e_ms=300.0,
                             num_requests=1, num_failed=0 if ok else 1, completion_tokens=4 if ok else 0))
    w.close()


def test_runs_sit_side_by_side_with_missing_rows_dashed(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    write_run(a, "fcfs", "interactive", ok=False, error="HTTP 503: busy")
    write_run(b, "slo", "deadline")
    table = format_table(load_runs([str(a), str(b)])).splitlines()
    rows = {line.split("  ")[0].strip(): line.split() for line in table[2:]}
    assert table[0].split() == ["metric", "fcfs", "slo"]
    assert rows["token goodput tok/s"][-2:] == ["0.0", "2.0"]  # 4 tokens met in 2 s
    assert rows["SLO targets"][-1] == "ttft<=500"
    assert rows["interactive: attainment req/traj"][-4:] == ["0.0%", "/", "0.0%", "-"]
    assert rows["errors: HTTP 503"][-2:] == ["1", "-"]
    names = [line.split("  ")[0].strip() for line in table[2:]]
    assert names.index("interactive: attainment req/traj") < names.index("deadline: attainment req/traj")
    assert names[-1] == "errors: HTTP 503"


def test_repeated_labels_are_named_by_file(tmp_path):
    a, b = tmp_path / "fcfs-1x.jsonl", tmp_path / "fcfs-2x.jsonl"
    write_run(a, "fcfs", "interactive")
    write_run(b, "fcfs", "interactive")
    assert [r.name for r in load_runs([str(a), str(b)])] == ["fcfs-1x", "fcfs-2x"]
