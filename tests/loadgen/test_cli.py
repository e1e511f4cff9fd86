"""`specrelay loadgen` as a user runs it: subprocesses against the fake server script on loopback."""

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

FAKE = Path(__file__).resolve().parent / "fake_openai.py"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loadgen(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "specrelay", "loadgen", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def endpoint():
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(FAKE), "--port", str(port)])
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail("the fake server did not start")
            time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=10)


def test_a_bad_slo_spec_exits_2_with_a_clear_message():
    out = loadgen("run", "--endpoint", "http://127.0.0.1:1", "--slo", "ttft=fast")
    assert out.returncode == 2
    assert out.stderr.strip() == ("specrelay loadgen: error: --slo ttft: 'fast' is not a duration "
                                  "(use e.g. 250, 250ms or 2.5s)")


def test_an_unreachable_endpoint_exits_2_with_a_clear_message():
    url = f"http://127.0.0.1:{free_port()}"
    out = loadgen("run", "--endpoint", url, "--num", "1")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith(f"specrelay loadgen: error: cannot reach {url}/v1/models")


def test_a_malformed_endpoint_and_conflicting_flags_are_rejected():
    out = loadgen("run", "--endpoint", "localhost:8000")
    assert out.returncode == 2 and "is not an http(s) URL" in out.stderr
    out = loadgen("run", "--endpoint", "http://127.0.0.1:1", "--rate", "2", "--concurrency", "3")
    assert out.returncode == 2 and "not allowed with argument" in out.stderr


def test_run_then_report_compares_runs_and_plots(endpoint, tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    out = loadgen("run", "--endpoint", endpoint, "--workload", "chat", "--concurrency", "2", "--num", "6",
                  "--slo", "interactive:ttft=5s,tpot=1s", "--label", "fcfs", "--out", str(a))
    assert out.returncode == 0, out.stderr
    assert "token goodput tok/s" in out.stdout and "interactive: attainment req/traj" in out.stdout
    assert "100.0% / 100.0%" in out.stdout
    out = loadgen("run", "--endpoint", endpoint, "--workload", "mixed", "--rate", "20", "--num", "8",
                  "--tool-pause-scale", "0.001", "--label", "slo", "--out", str(b))
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in b.read_text().splitlines()]
    assert {rec["type"] for rec in lines} == {"run", "request", "trajectory"}
    png = tmp_path / "cmp.png"
    out = loadgen("report", str(a), str(b), "--plot", str(png))
    assert out.returncode == 0, out.stderr
    header = out.stdout.splitlines()[0].split()
    assert header == ["metric", "fcfs", "slo"]
    assert png.stat().st_size > 10_000


def test_report_on_a_file_that_is_not_records_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"hello": 1}\n')
    out = loadgen("report", str(bad))
    assert out.returncode == 2 and f"{bad}:1: not a loadgen record" in out.stderr
    out = loadgen("report", str(tmp_path / "missing.jsonl"))
    assert out.returncode == 2 and "cannot read" in out.stderr


def test_sweep_restarts_a_server_command_per_policy(tmp_path):
    cmd = f"{sys.executable} {FAKE} --port {{port}} --schedule {{schedule}}"
    out = loadgen("sweep", "--server-cmd", cmd, "--schedules", "fcfs,slo", "--workload", "chat", "--num", "8",
                  "--capacity-start-rate", "20", "--capacity-max-rates", "2", "--capacity-duration", "2",
                  "--capacity-drain", "1", "--factors", "0.5,2",
                  "--out-dir", str(tmp_path), timeout=240)
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "sweep.json").read_text())
    assert report["capacity_trajectories_per_s"] > 0 and report["capacity_measured_on"] == "fcfs"
    assert [v["rate"] for v in report["capacity"]["curve"]] == [20.0, 40.0]
    assert "verdict" in out.stderr and "capacity:" in out.stderr
    assert list(report["policies"]) == ["fcfs", "slo"]
    for points in report["policies"].values():
        assert [p["factor"] for p in points] == [0.5, 2.0]
        assert points[1]["rate"] == pytest.approx(2 * report["capacity_trajectories_per_s"])
        assert all(p["num_trajectories"] == 8 and p["num_failed"] == 0 for p in points)
    assert set(report["comparison"]["slo"]["token_goodput_ratio"]) == {"2.0"}
    assert "slo vs fcfs: token goodput ratio under overload" in out.stdout
    assert (tmp_path / "sweep.png").stat().st_size > 10_000
    assert (tmp_path / "slo-2x.jsonl").exists() and (tmp_path / "server-fcfs.log").exists()


def _capacity_args(*args):
    import argparse

    from specrelay.loadgen.cli import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(["capacity", *args])


def test_capacity_prints_its_curve_and_writes_it(endpoint, tmp_path, capsys):
    args = _capacity_args("--endpoint", endpoint, "--workload", "chat", "--start-rate", "20", "--max-rates", "2",
                          "--duration", "2", "--drain", "1", "--out-dir", str(tmp_path))
    assert args._handler(args) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:3] == ["rate/s", "offered/s", "achieved/s"]
    report = json.loads((tmp_path / "capacity.json").read_text())
    capacity = report["capacity_trajectories_per_s"]  # the verdicts are test_capacity*.py's business
    assert capacity == max(v["rate"] for v in report["curve"] if v["passed"])
    assert f"capacity: at least {capacity:.4g} trajectories/s" in out or f"capacity: {capacity:.4g} tra" in out
    assert report["search"]["duration_s"] == 2.0 and len(report["curve"]) == 2
    assert report["criterion"]["min_keep_up"] == 0.95 and "sqrt(mean in flight)" in report["criterion"]["rule"]


@pytest.mark.parametrize("args, message", [
    (["--endpoint", "http://127.0.0.1:1", "--server-cmd", "x"], "one of the two"),
    ([], "one of the two"),
    (["--endpoint", "http://127.0.0.1:1", "--num", "5"], "not --num"),
    (["--endpoint", "http://127.0.0.1:1", "--growth", "1"], "growth must be above 1"),
])
def test_capacity_settings_are_checked(args, message, tmp_path):
    from specrelay.shared.errors import ConfigError

    parsed = _capacity_args(*args, "--out-dir", str(tmp_path))
    with pytest.raises(ConfigError, match=message):
        parsed._handler(parsed)
