"""`specrelay calibrate` measures the model it is given and writes a profile the verifier loads; without one the
verifier falls back to the paper's analytic γ, and says so."""

from __future__ import annotations

import json
import types

import pytest

from specrelay.cli import main
from specrelay.shared.modeling.loader import load_model
from specrelay.shared.pte import PteProfile
from specrelay.shared.pte_profiles import find_profile, profile_path

from ..conftest import save_tiny_llama


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("calib"), seed=4)


@pytest.fixture
def virtual_clock(monkeypatch):
    """calibrate times real forwards of the tiny model; on a loaded machine a 2-layer model's timings are noise and
    the fitted prefill cost can come out negative. Here each forward still runs, but advances a virtual clock by a
    known cost (1 ms + 20 us per new token + 0.1 us per cached token), and calibrate reads that clock."""
    from specrelay.services import calibrate as calibrate_module
    from specrelay.shared.modeling.runner import ModelRunner

    now = [0.0]
    forward = ModelRunner.forward

    def timed_forward(self, steps):
        now[0] += 1e-3 + sum(2e-5 * len(s.token_ids) + 1e-7 * s.table.num_tokens for s in steps)
        return forward(self, steps)

    monkeypatch.setattr(ModelRunner, "forward", timed_forward)
    monkeypatch.setattr(calibrate_module, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))


def test_calibrate_writes_a_profile_the_verifier_loads(tiny_dir, tmp_path, monkeypatch, capsys, virtual_clock):
    monkeypatch.setenv("SPECRELAY_CACHE_DIR", str(tmp_path / "cache"))
    assert main(["calibrate", "--model", str(tiny_dir), "--quick", "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    written = profile_path(tiny_dir, "cpu")
    assert written.is_file() and str(written) in printed and "gamma =" in printed
    profile = PteProfile.load(written)
    assert profile.prefill_s_per_token > 0 and profile.gamma >= 0 and profile.device == "cpu"
    # the fit recovers the virtual clock's costs: p = 20 us per prompt token, step(L) = 1.02 ms + 0.1 us per token
    assert profile.prefill_s_per_token == pytest.approx(2e-5, rel=1e-6)
    assert (profile.decode_a_s, profile.decode_b_s_per_ctx_token) == pytest.approx((1.02e-3, 1e-7), rel=1e-6)
    # the verifier's lookup finds it for this model and device, and an explicit file wins over it
    model = load_model(tiny_dir)
    found, source = find_profile(None, tiny_dir, "cpu", model)
    assert (found, source) == (profile, "calibrated")
    other = tmp_path / "given.json"
    PteProfile(gamma=0.5, prefill_s_per_token=1e-3).save(other)
    assert find_profile(str(other), tiny_dir, "cpu", model)[1] == "file"
    assert find_profile(None, tiny_dir, "cuda:0", model)[1] == "analytic"  # nothing measured on that device


def test_calibrate_out_file_and_bad_input(tiny_dir, tmp_path, capsys, virtual_clock):
    out = tmp_path / "p.json"
    assert main(["calibrate", "--model", str(tiny_dir), "--lengths", "16,64,160", "--repeats", "1",
                 "--threads", "1", "--out", str(out)]) == 0
    assert set(json.loads(out.read_text())) >= {"gamma", "prefill_s_per_token", "decode_a_s",
                                                 "decode_b_s_per_ctx_token"}
    assert main(["calibrate", "--model", str(tiny_dir), "--lengths", "16", "--out", str(out)]) == 2
    assert "at least two lengths" in capsys.readouterr().err
    assert main(["calibrate", "--model", str(tiny_dir), "--lengths", "16,5000", "--out", str(out)]) == 2
    assert "must be in [1, 1023]" in capsys.readouterr().err
    assert main(["calibrate", "--model", str(tmp_path / "missing")]) == 2


def test_the_analytic_fallback_is_the_papers_gamma(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SPECRELAY_CACHE_DIR", str(tmp_path))
    model = load_model(tiny_dir)
    profile, source = find_profile(None, tiny_dir, "cpu", model)
    n = sum(p.numel() for p in model.parameters())
    # 2 layers, d_model 64, 2 of 4 heads share K/V, HOI 756.5 FLOP/B (module docstring of shared/pte.py)
    assert source == "analytic" and profile.beta == 0
    assert profile.gamma == pytest.approx(2 * 2 * 64 * 0.5 * 756.5 / n)


def test_if_missing_keeps_an_existing_profile(tiny_dir, tmp_path, capsys):
    out = tmp_path / "p.json"
    PteProfile(gamma=0.5, prefill_s_per_token=1e-3).save(out)
    before = out.read_text()
    assert main(["calibrate", "--model", str(tiny_dir), "--out", str(out), "--if-missing"]) == 0
    assert out.read_text() == before and "not measuring again" in capsys.readouterr().out
    out.unlink()
    assert main(["calibrate", "--model", str(tiny_dir), "--quick", "--threads", "1", "--out", str(out),
                 "--if-missing"]) == 0
    assert PteProfile.load(out).gamma != 0.5
