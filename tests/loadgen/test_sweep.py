"""The sweep against two running endpoints (in-process), and the comparison it reports."""

import json

import pytest

from specrelay.loadgen.runner import RunConfig
from specrelay.loadgen.sweep import SweepConfig, Target, compare, measure_capacity, run_sweep
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
    cfg = SweepConfig(targets=[Target("fcfs", slow), Target("slo", fast)], base=base, out_dir=str(tmp_path),
                      factors=(0.5, 1.5), capacity_concurrency=4, capacity_max_concurrency=4,
                      capacity_num=8)
    lines = []
    report = await run_sweep(cfg, log=lines.append)
    assert report == json.loads((tmp_path / "sweep.json").read_text())
    fcfs, slo = report["policies"]["fcfs"], report["policies"]["slo"]
    assert [p["rate"] for p in fcfs] == [p["rate"] for p in slo]
    assert fcfs[1]["rate"] == pytest.approx(1.5 * report["capacity_trajectories_per_s"])
    assert set(fcfs[0]["per_class"]) == {"interactive"}
    assert lines[0].startswith("capacity probe: concurrency 4:") and lines[1].startswith("capacity on fcfs:")
    assert len(lines) == 6
    assert (tmp_path / "sweep.png").exists() and (tmp_path / "capacity-c4.jsonl").exists()


@pytest.mark.parametrize("server_slots, expected_probes", [(1, [1, 2]), (4, [1, 2, 4])])
async def test_capacity_probes_double_workers_while_throughput_grows(serve_fake, fake, tmp_path, server_slots,
                                                                     expected_probes):
    # 60 ms a request; the server serves `server_slots` at once, so throughput stops growing past that.
    url, _ = await serve_fake(fake.FakeBehaviour(num_tokens=6, token_delay_s=0.01, max_concurrency=server_slots))
    base = RunConfig(endpoint=url, workload="chat", num=12, progress=False)
    cfg = SweepConfig(targets=[Target("fcfs", url)], base=base, out_dir=str(tmp_path), capacity_concurrency=1,
                      capacity_max_concurrency=16)
    capacity, runs = await measure_capacity(cfg, url, log=lambda line: None)
    probes = [r["concurrency"] for r in runs]
    assert probes[:len(expected_probes)] == expected_probes and probes == [2 ** i for i in range(len(probes))]
    if server_slots == 1:
        assert probes == [1, 2]  # twice the workers, same throughput: stop
    assert capacity == max(r["trajectories_per_s"] for r in runs)
    assert capacity == pytest.approx(server_slots / 0.06, rel=0.35)


def test_sweep_settings_are_checked():
    base = RunConfig(endpoint="http://127.0.0.1:1", workload="chat")
    with pytest.raises(ConfigError, match="labels must differ"):
        SweepConfig(targets=[Target("a", "x"), Target("a", "y")], base=base, out_dir="o")
    with pytest.raises(ConfigError, match="--factors must be positive"):
        SweepConfig(targets=[Target("a", "x")], base=base, out_dir="o", factors=(1.0, 0.0))
    with pytest.raises(ConfigError, match="capacity concurrency"):
        SweepConfig(targets=[Target("a", "x")], base=base, out_dir="o", capacity_concurrency=128)
    with pytest.raises(ConfigError, match="needs --endpoint"):
        SweepConfig(targets=[], base=base, out_dir="o")


async def test_a_server_command_that_dies_or_cannot_start_is_a_clear_error(tmp_path):
    from specrelay.loadgen.client import EndpointError

    base = RunConfig(endpoint="http://127.0.0.1:1", workload="chat", progress=False)
    dies = SweepConfig(targets=[Target("fcfs", server_cmd="sh -c 'echo no model here; exit 3'")], base=base,
                       out_dir=str(tmp_path))
    with pytest.raises(EndpointError, match="exited with status 3 before serving:\nno model here"):
        await run_sweep(dies)
    missing = SweepConfig(targets=[Target("fcfs", server_cmd=str(tmp_path / "no-such-server"))], base=base,
                          out_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="cannot start"):
        await run_sweep(missing)
