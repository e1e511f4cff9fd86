"""`specrelay bench relay` end to end on a tiny random model: the JSON a user reads, and user mistakes."""

from __future__ import annotations

import argparse
import json

import pytest

from specrelay.bench.relay import add_relay_arguments, main_relay
from specrelay.shared.errors import SpecrelayError

from ..conftest import save_tiny_llama


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_relay_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("relay-bench"), seed=17, num_hidden_layers=3)


def test_quick_bench_writes_every_method_per_span_length(model_dir, tmp_path, capsys):
    out = tmp_path / "relay.json"
    assert main_relay(parse("--model", str(model_dir), "--quick", "--spans", "96,128", "--greedy-tokens", "8",
                            "--json", str(out))) == 0
    report = json.loads(out.read_text())
    assert set(report["spans"]) == {"96", "128"}
    for span in report["spans"].values():
        methods = span["methods"]
        assert span["num_prompts"] == 2  # the worker's and the reviewer's prefill
        assert set(methods) == {"full_prefill", "naive_reuse", "epic", "cacheblend", "relaycaching"}
        for m in methods.values():
            assert {"reuse_rate", "ttft_ms", "greedy_agreement", "mean_kl"} <= set(m) and m["ttft_ms"] > 0
        assert methods["full_prefill"]["reuse_rate"] == 0 and methods["full_prefill"]["mean_kl"] == 0
        assert methods["full_prefill"]["greedy_agreement"] == 1.0 and methods["full_prefill"]["diverged"] == 0
        assert methods["full_prefill"]["first_token_agreement"] == 1.0
        # a first token that differs is a divergence at position 0, so it cannot beat whole-answer agreement
        assert all(m["first_token_agreement"] >= m["greedy_exact"] for m in methods.values())
        assert all(m["diverged_at_near_tie"] <= m["diverged"] <= 2 for m in methods.values())
        assert methods["naive_reuse"]["reuse_rate"] == 1.0 and methods["naive_reuse"]["mean_kl"] > 0
        assert 0.5 < methods["cacheblend"]["reuse_rate"] < 1.0 and 0.0 < methods["relaycaching"]["reuse_rate"] < 1.0
        # EPIC recomputes each span's first 16 tokens: reuse is what is left of the spans
        assert 0.5 < methods["epic"]["reuse_rate"] < 1.0
        # the task check: every method answered the same 2 questions; full prefill agrees with itself
        assert all(m["task_questions"] == 2 and 0.0 <= m["task_accuracy"] <= 1.0 for m in methods.values())
        assert methods["full_prefill"]["task_same"] == 1.0
    printed = capsys.readouterr().out
    assert "relay span 96 tokens" in printed and "relaycaching" in printed and "epic" in printed
    assert "goal reuse_rate >= 0.8 (longest span)" in printed
    assert set(report["goals"]) == {"greedy_agreement >= 0.95 (every span)", "first_token_agreement = 1.0 (every span)",
                                    "task_accuracy = full prefill's (every span)", "reuse_rate >= 0.8 (longest span)",
                                    "ttft_speedup >= 3 (longest span)",
                                    "greedy_agreement above naive reuse and CacheBlend (every span)"}
    # RelayCaching checked over the band the model's layer profile chose (measured and cached on first use)
    assert report["settings"]["check_layers"] and min(report["settings"]["check_layers"]) >= 1


def test_layer_profile_prints_the_table_and_caches_the_band(model_dir, tmp_path, capsys):
    from specrelay.services.verifier import relay_profile
    from specrelay.services.verifier.prefix_cache import model_id

    out = tmp_path / "profile.json"
    assert main_relay(parse("--model", str(model_dir), "--layer-profile", "--spans", "64", "--pipelines", "2",
                            "--json", str(out))) == 0
    profile = json.loads(out.read_text())
    assert profile["num_layers"] == 3 and profile["num_prompts"] == 2 and len(profile["dev_v"]) == 3
    # layer 0's K/V depend on the token and its position only: relayed equals fresh there, up to rounding
    assert profile["dev_v"][0] < 1e-5 and profile["dev_k"][0] < 1e-5
    assert min(profile["dev_v"][1:]) > 1e-4  # deeper layers saw another context upstream
    printed = capsys.readouterr().out
    assert "per-layer deviation" in printed and "<- last check layer" in printed
    import torch

    cached = relay_profile.load(relay_profile.profile_path(model_id(model_dir, torch.float32)))
    assert cached is not None and cached.check_layers == profile["check_layers"]
    assert relay_profile.band_for(model_id(model_dir, torch.float32)) == (tuple(profile["check_layers"]),
                                                                         profile["recompute_first"])
    assert profile["recompute_first"] in (0, 16)


@pytest.mark.parametrize("argv, message", [
    (("--spans", "64,x"), "comma-separated integers"),
    (("--pipelines", "0"), "must be positive"),
    (("--task-questions", "-1"), "must be non-negative"),
    (("--spans", "4000"), "past the model's"),
])
def test_user_mistakes_are_one_line_errors(model_dir, argv, message):
    with pytest.raises(SpecrelayError, match=message):
        main_relay(parse("--model", str(model_dir), "--quick", *argv))


def test_missing_model_names_the_fix(tmp_path):
    with pytest.raises(SpecrelayError, match="specrelay models train"):
        main_relay(parse("--model", str(tmp_path / "nothing")))
