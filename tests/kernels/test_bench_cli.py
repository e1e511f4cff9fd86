"""`specrelay kernels bench`: refuses without a GPU unless --allow-cpu; the tiny CPU run writes the report's
schema, with the kernels (interpreted) timed beside their references and the parity check passing."""

from __future__ import annotations

import json

import pytest
import torch

from specrelay.cli import main


def test_refuses_without_gpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert main(["kernels", "bench", "--json", "unused.json"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_cpu_smoke_run_writes_the_report(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["kernels", "bench", "--allow-cpu", "--batches", "1,2", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "tree_attention" in printed and "verify(6) vs decode(1)" in printed
    report = json.loads(out.read_text())
    assert report["device"]["type"] == "cpu" and report["device"]["peak_bandwidth_gbps"] is None
    names = [k["name"] for k in report["kernels"]]
    assert names == ["tree_attention", "spec_accept_greedy", "spec_accept_sampling", "rope_shift", "kv_compact"]
    for entry in report["kernels"]:
        timed = {r["impl"]: r for r in entry["results"] if "ms" in r}
        assert {"triton", "reference"} <= set(timed), entry
        assert all(r["ms"] > 0 and r["gbps"] > 0 for r in timed.values())
        assert entry["triton_speedup_vs_best_torch"] is not None
        verdict = timed["triton"]
        assert verdict.get("matches_reference", True) and verdict.get("max_abs_err_vs_reference", 0.0) < 1e-4, entry
    attention = {r["impl"]: r for r in report["kernels"][0]["results"]}
    assert attention["sdpa_mask"]["max_abs_err_vs_reference"] < 1e-4 and "skipped" in attention["flex_attention"]
    model = report["verify_vs_decode"]
    assert [b["num_seqs"] for b in model["batches"]] == [1, 2] and model["attention"] == "triton"
    assert all(p["checked"] and p["greedy_token_agreement"] == 1.0 for p in model["parity"])
    assert set(report["goals"]) == {"tree_attention_vs_sdpa_mask", "verify64_over_decode1"}


def test_bad_batches_is_a_user_error(capsys):
    assert main(["kernels", "bench", "--allow-cpu", "--batches", "1,x"]) == 2
    assert "--batches" in capsys.readouterr().err
