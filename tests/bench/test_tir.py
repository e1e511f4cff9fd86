"""`specrelay bench tir`: the JSON a user reads, each policy's invariants, the workload, and user mistakes."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest

from specrelay.bench.tir import add_arguments, main, pearson
from specrelay.bench.tir_workload import TOOL_KINDS, WorkloadConfig, make_workload
from specrelay.models.resolve import PAIR_DIR
from specrelay.shared.errors import ConfigError

TARGET = PAIR_DIR / "target"  # the small pair: the bench's default is the real model, too slow for the suite
pytestmark = pytest.mark.skipif(not (TARGET / "config.json").is_file(), reason="embedded target not built")


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv) if "--model" in argv else ["--model", str(TARGET), *argv])


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("tir") / "tir.json"
    assert main(parse("--quick", "--trajectories", "4", "--max-turns", "2", "--policies", "drop,keep,pte,infercept",
                      "--json", str(out))) == 0
    return json.loads(out.read_text())


def test_quick_report_has_the_documented_shape(quick_report):
    assert set(quick_report["policies"]) == {"drop", "keep", "pte", "infercept"}
    for row in quick_report["policies"].values():
        assert {"wall_s", "pte", "recomputed_tokens", "peak_kv_bytes"} <= set(row)
        assert row["wall_s"] >= row["compute_s"] > 0 and row["pte"] > 0
    rows = quick_report["trajectories"]
    assert len(rows) == 4 and all(set(r["latency_s"]) == set(quick_report["policies"]) for r in rows)
    assert sum(len(r["tool_calls"]) for r in rows) == quick_report["workload"]["tool_calls"]
    for name, row in quick_report["policies"].items():
        assert sum(r["pte"][name] for r in rows) == pytest.approx(row["pte"], abs=1)
    for key in ("corr_wall_pte", "corr_wall_tokens"):
        assert quick_report[key] is None or -1 <= quick_report[key] <= 1
    assert set(quick_report["goals"]) == {"pte_wall_30pct_below_drop", "pte_peak_kv_within_budget",
                                          "corr_wall_pte_at_least_0.9", "corr_wall_pte_above_corr_wall_tokens"}


def test_policies_keep_their_promises(quick_report):
    p, budget = quick_report["policies"], quick_report["kv_budget_bytes"]
    # drop prefills every earlier context again; keep never does; the PTE policy recomputes at most the partial
    # block tails the kvstore does not hold (or what it chose to drop).
    assert p["drop"]["recomputed_tokens"] > 0 and p["drop"]["decisions"] == {"drop": quick_report["workload"][
        "tool_calls"]}
    assert p["keep"]["recomputed_tokens"] == 0 and p["keep"]["reloaded_tokens"] == 0
    assert p["pte"]["recomputed_tokens"] < p["drop"]["recomputed_tokens"]
    # The budget binds: keep-everything goes past it (it was sized at half keep's peak), the others stay within.
    assert p["keep"]["peak_kv_bytes"] > budget
    for name in ("drop", "pte", "infercept"):
        assert p[name]["peak_kv_bytes"] <= budget and p[name]["within_budget"]
    assert not p["keep"]["within_budget"]
    # The recompute is PTE the other policies do not pay.
    assert p["drop"]["pte"] > p["keep"]["pte"] and p["drop"]["pte"] > p["pte"]["pte"]


def test_reused_kv_gives_the_same_greedy_tokens(quick_report):
    """Kept and reloaded KV are the KV the context had: every turn generates what drop-and-recompute does."""
    for name in ("keep", "pte", "infercept"):
        same, total = quick_report["policies"][name]["outputs_same_as_drop"].split("/")
        assert same == total


def test_workload_is_seeded_and_fits_the_context():
    cfg = WorkloadConfig(num_trajectories=12, max_turns=6, max_context=3000, seed=3)
    a, b = make_workload(cfg), make_workload(cfg)
    assert a == b and a != make_workload(WorkloadConfig(num_trajectories=12, max_turns=6, max_context=3000, seed=4))
    assert all(t.total_tokens <= 3000 for t in a)
    tools = {turn.tool for t in a for turn in t.turns}
    assert tools == {k.name for k in TOOL_KINDS}
    for t in a:
        for turn in t.turns:
            kind = next(k for k in TOOL_KINDS if k.name == turn.tool)
            assert kind.pause_s[0] <= turn.pause_s <= kind.pause_s[1]
            assert kind.response_tokens[0] <= len(turn.response) <= kind.response_tokens[1]


def test_pearson():
    assert pearson([1, 2, 3], [2, 4, 6.5]) == pytest.approx(0.99795, abs=1e-4)
    assert math.isnan(pearson([1, 1, 1], [1, 2, 3]))  # no spread: undefined, reported as null


@pytest.mark.parametrize("argv, message", [
    (("--policies", "drop,lru"), "unknown lru"),
    (("--kv-budget-blocks", "3"), "cannot hold this workload's longest trajectory"),
    (("--budget-fraction", "1.5"), "--budget-fraction"),
    (("--profile-decode-batch", "0"), "--profile-decode-batch"),
    (("--model", "/nonexistent/model"), "no model there"),
])
def test_user_mistakes_are_clear_errors(argv, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        main(parse("--quick", *argv))


def test_workload_too_long_for_the_context_is_refused():
    with pytest.raises(ConfigError, match="too small"):
        WorkloadConfig(max_context=1000)


def test_bench_is_registered_under_specrelay_bench():
    from specrelay.bench import cli as bench

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["tir", "--quick", "--json", "out.json"])
    assert args._bench_main is main and args.quick and args.json == Path("out.json")
