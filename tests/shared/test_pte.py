"""PTE: the paper's γ, fitting γ from timings, profile files, and per-turn / per-trajectory accounting."""

from __future__ import annotations

import json
import random

import pytest

from specrelay.shared.errors import ConfigError
from specrelay.shared.pte import (
    PteAccount,
    PteProfile,
    TurnTokens,
    analytic_gamma,
    measure_profile,
    trajectory_pte,
    turn_pte,
)


def test_analytic_gamma_matches_the_paper_order_for_llama_and_qwen():
    # Llama-3.1-8B: 32 layers, d_model 4096, 8 KV / 32 Q heads, 8.03e9 parameters; the paper quotes γ ≈ 0.00625.
    llama = analytic_gamma(32, 4096, 8, 32, 8.03e9)
    assert llama == pytest.approx(2 * 32 * 4096 * 0.25 * (1513 / 2.0) / 8.03e9)
    assert llama == pytest.approx(0.00625, rel=0.05)
    # Qwen2.5-7B (28 layers, 3584, 4/28 heads) has the smaller γ because of its stronger GQA, as in the paper.
    qwen = analytic_gamma(28, 3584, 4, 28, 7.62e9)
    assert qwen < llama / 1.5


def test_fit_recovers_gamma_and_beta_from_noisy_timings():
    rng = random.Random(0)
    p, a, b = 2e-5, 8e-3, 4e-8  # 20 µs per prefill token; an 8 ms step growing 40 ns per context token
    prefill = [(n, 0.003 + p * n * (1 + rng.gauss(0, 0.01))) for n in (128, 256, 512, 1024, 2048, 4096)]
    decode = [(L, (a + b * L) * (1 + rng.gauss(0, 0.01))) for L in (256, 1024, 4096, 8192, 16384, 32768)]
    profile = PteProfile.fit(prefill, decode, device="cpu", model="toy")
    assert profile.gamma == pytest.approx(b / p, rel=0.1)
    assert profile.beta == pytest.approx(a / p, rel=0.1)
    # A decode step at 32k context costs what the fitted line says, in prefill tokens.
    assert profile.seconds(profile.decode_step_pte(32768)) == pytest.approx(a + b * 32768, rel=0.05)


def test_fit_refuses_unusable_measurements():
    with pytest.raises(ConfigError, match="at least 2"):
        PteProfile.fit([(100, 1.0)], [(100, 0.1), (200, 0.2)])
    with pytest.raises(ConfigError, match="one x value"):
        PteProfile.fit([(100, 1.0), (100, 1.1)], [(100, 0.1), (200, 0.2)])
    with pytest.raises(ConfigError, match="prefill cost"):
        PteProfile.fit([(100, 2.0), (200, 1.0)], [(100, 0.1), (200, 0.2)])


def test_profile_saves_and_loads(tmp_path):
    profile = PteProfile(gamma=0.002, prefill_s_per_token=1e-4, decode_a_s=0.01, decode_b_s_per_ctx_token=2e-7,
                         device="NVIDIA H100", model="models/target")
    path = tmp_path / "pte.json"
    profile.save(path)
    on_disk = json.loads(path.read_text())
    assert set(on_disk) == {"gamma", "prefill_s_per_token", "decode_a_s", "decode_b_s_per_ctx_token", "device",
                            "model"}
    assert PteProfile.load(path) == profile


@pytest.mark.parametrize("text, match", [
    ("not json", "cannot read"),
    ('{"gamma": 0.1}', "prefill_s_per_token"),
    ('{"gamma": -1, "prefill_s_per_token": 1e-4}', "gamma"),
    ('{"gamma": 0.1, "prefill_s_per_token": 0}', "prefill_s_per_token"),
])
def test_a_bad_profile_is_a_config_error(tmp_path, text, match):
    path = tmp_path / "pte.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        PteProfile.load(path)


def test_turn_pte_counts_decode_by_context_length():
    profile = PteProfile(gamma=0.01, prefill_s_per_token=1e-4)
    # 1000 prompt tokens prefilled, then 50 generated at context 1000: 1000 + 0.01·1000·50 = 1500.
    usage = turn_pte(profile, TurnTokens(prefilled_tokens=1000, decode_tokens=50))
    assert usage.prefill == 1000 and usage.decode == pytest.approx(500) and usage.total == pytest.approx(1500)
    assert usage.full_eviction_total == pytest.approx(1500)


def test_kept_kv_saves_exactly_the_recomputation_the_paper_charges():
    profile = PteProfile(gamma=0.01, prefill_s_per_token=1e-4)
    first = TurnTokens(prefilled_tokens=1000, decode_tokens=50)
    # Second turn: a 400-token tool response arrives; the 1050-token context was either kept or dropped.
    kept = [first, TurnTokens(prefilled_tokens=400, cached_tokens=1050, decode_tokens=20, tool_response_tokens=400)]
    dropped = [first, TurnTokens(prefilled_tokens=400, recomputed_tokens=1050, decode_tokens=20,
                                 tool_response_tokens=400)]
    u_kept, u_dropped = trajectory_pte(profile, kept), trajectory_pte(profile, dropped)
    # Decode in turn 2 runs at context 1450 either way: 0.01·1450·20 = 290.
    assert u_kept.decode == pytest.approx(500 + 290)
    assert u_kept.recompute == 0 and u_dropped.recompute == 1050
    assert u_dropped.total - u_kept.total == pytest.approx(1050)
    # The paper's full-eviction PTE does not depend on what we kept, and equals ours when everything was dropped.
    assert u_kept.full_eviction_total == pytest.approx(u_dropped.full_eviction_total)
    assert u_dropped.full_eviction_total == pytest.approx(u_dropped.total)
    assert u_kept.tool_response_tokens == 400
    assert u_kept.to_dict() == {"total": pytest.approx(1000 + 400 + 790), "prefill": 1400.0,
                                "decode": pytest.approx(790), "recompute": 0.0, "tool_response_tokens": 400,
                                "full_eviction_total": pytest.approx(2450 + 790), "gamma": 0.01}


def test_calibrated_beta_charges_every_decode_step():
    profile = PteProfile(gamma=0.0, prefill_s_per_token=1e-4, decode_a_s=5e-3)  # β = 50 prefill tokens a step
    account = PteAccount(profile)
    account.add(TurnTokens(prefilled_tokens=10, decode_tokens=4))
    assert account.usage.decode == pytest.approx(200)


def test_measure_profile_takes_the_median_of_repeats():
    calls = {"n": 0}

    def prefill_s(n):
        calls["n"] += 1
        return 1.0 if calls["n"] % 3 == 0 else 1e-3 + 2e-5 * n  # every third run is a stray slow one

    profile = measure_profile(prefill_s, lambda L: 5e-3 + 1e-8 * L, [256, 1024, 4096], [512, 8192, 32768],
                              repeats=3, device="test", model="toy")
    assert profile.prefill_s_per_token == pytest.approx(2e-5)
    assert profile.gamma == pytest.approx(1e-8 / 2e-5) and profile.beta == pytest.approx(5e-3 / 2e-5)
    assert (profile.device, profile.model) == ("test", "toy")
