"""On a CUDA device: the compiled kernels against the references at bench sizes, and the 1B-class model's verify
step with kernels against the torch path (greedy tokens equal). Runs the bench command in a fresh process, since
this folder's conftest imports triton with its interpreter on."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.gpu


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bench_on_gpu_matches_references(tmp_path):
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "SPECRELAY_KERNELS")}
    proc = subprocess.run([sys.executable, "-m", "specrelay", "kernels", "bench", "--batches", "1,4", "--json",
                           str(out)], env=env, capture_output=True, text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())
    for entry in report["kernels"]:
        kernel = next(r for r in entry["results"] if r["impl"] == "triton")
        assert "ms" in kernel, kernel
        assert kernel.get("matches_reference", True), entry["name"]
        assert kernel.get("max_abs_err_vs_reference", 0.0) < 2e-2, entry["name"]  # bf16
    model = report["verify_vs_decode"]
    assert model["attention"] == "triton"
    for parity in model["parity"]:
        # random weights leave near-ties among 128k logits; bf16 rounding may flip a few of them
        assert parity["checked"] and parity["greedy_token_agreement"] >= 0.95, parity
