"""The sweep against two running endpoints (in-process), and the comparison it reports."""

import json

import pytest

from specrelay.loadgen.runner import RunConfig
from specrelay.loadgen.capacity import CapacitySearch
from specrelay.loadgen.sweep import SweepConfig, Target, compare, run_sweep
from specrelay.shared.errors import ConfigError


def point(factor, goodput, starved=()):
    return {"factor": factor, "token_goodput": goodput, "starved_classes": list(starved)}


def test_compare_reports_the_goodput_ratio_under_overload_and_starved_classes():
    policies = {"fcfs": [point(0.5, 100), point(1.5, 80), point(2.0, 50)],
                "slo": [point(0.5, 100), point(1.5, 120), point(2.0, 90, ["deadline"])]}
    c = compare(policies)
    assert c["baseline"] == "fcfs" and c["overload_factors"] == [1.5, 2.0]
    assert c["slo"]["token_goodput_ratio"] == {"1.5": 1.5, "2.0": 1.8}
    assert c["slo"]["min_ratio_under_overload"] == 1.5
    assert c["slo"]["starved"] == {"2.0": ["deadline"]}
    assert compare({"fcfs": policies["fcfs"]}) is None


async def test_a_sweep_over_two_endpoints_uses_the_same_rates(serve_fake, fake, tmp_path):
    slow, _ = await serve_fake(fake.FakeBehaviour(num_tokens=6, token_delay_s=0.004, max_concurrency=2))
    fast, _ = await serve_fake(fake.FakeBehaviour(num_tokens=6, token_delay_s=0.001, max_concurrency=2))
    base = RunConfig(endpoint=slow, workload="chat", num=6, progress=False)
    # Two short capacity runs, far below the slow server's ~70/s, each long enough to judge (N >= 5a).
    search = CapacitySearch(start_rate=20.0, duration_s=2.0, growth=2.0, max_rates=2, drain_s=1.0)
    cfg = SweepConfig(targets=[Target("fcfs", slow), Target("slo", fast)], base=base, out_dir=str(tmp_path),
                      factors=(0.5, 1.5), capacity_search=search)
    lines = []
    report = await run_sweep(cfg, log=lines.append)
    assert report == json.loads((tmp_path / "sweep.json").read_text())
    fcfs, slo = report["policies"]["fcfs"], report["policies"]["slo"]
    assert [p["rate"] for p in fcfs] == [p["rate"] for p in slo]
    # The verdicts are test_capacity's business; here, that the sweep runs its points at what the search found.
    capacity = report["capacity_trajectories_per_s"]
    curve = report["capacity"]["curve"]
    assert report["capacity_measured_on"] == "fcfs" and curve[0]["rate"] == 20.0 and len(curve) == 2
    assert capacity == max(v["rate"] for v in curve if v["passed"])
    assert fcfs[1]["rate"] == pytest.approx(1.5 * capacity)
    assert set(fcfs[0]["per_class"]) == {"interactive"}
    assert fcfs[0]["per_class"]["interactive"]["ttft_p99_ms"] >= fcfs[0]["per_class"]["interactive"]["ttft_p50_ms"]
    assert fcfs[0]["records"] == "fcfs-0.5x.jsonl"  # a name inside the output folder, no machine path
    assert lines[0].startswith("rate 20/s: achieved") and "capacity: " in lines[2].splitlines()[-1]
    assert len(lines) == 7
    assert (tmp_path / "sweep.png").exists() and (tmp_path / "capacity-20.jsonl").exists()


def test_sweep_settings_are_checked():
    base = RunConfig(endpoint="http://127.0.0.1:1", workload="chat")
    with pytest.raises(ConfigError, match="labels must differ"):
        SweepConfig(targets=[Target("a", "x"), Target("a", "y")], base=base, out_dir="o", capacity=1.0)
    with pytest.raises(ConfigError, match="--factors must be positive"):
        SweepConfig(targets=[Target("a", "x")], base=base, out_dir="o", factors=(1.0, 0.0), capacity=1.0)
    with pytest.raises(ConfigError, match="needs --capacity or a capacity search"):
        SweepConfig(targets=[Target("a", "x")], base=base, out_dir="o")
    with pytest.raises(ConfigError, match="needs --endpoint"):
        SweepConfig(targets=[], base=base, out_dir="o", capacity=1.0)


async def test_a_server_command_that_dies_or_cannot_start_is_a_clear_error(tmp_path):
    from specrelay.loadgen.client import EndpointError

    base = RunConfig(endpoint="http://127.0.0.1:1", workload="chat", progress=False)
    dies = SweepConfig(targets=[Target("fcfs", server_cmd="sh -c 'echo no model here; exit 3'")], base=base,
                       out_dir=str(tmp_path), capacity=1.0)
    with pytest.raises(EndpointError, match="exited with status 3 before serving:\nno model here"):
        await run_sweep(dies)
    missing = SweepConfig(targets=[Target("fcfs", server_cmd=str(tmp_path / "no-such-server"))], base=base,
                          out_dir=str(tmp_path), capacity=1.0)
    with pytest.raises(ConfigError, match="cannot start"):
        await run_sweep(missing)
