"""`specrelay bench relay` end to end on a tiny random model: the JSON a user reads, and user mistakes."""

from __future__ import annotations

import argparse
import json

import pytest

from specrelay.services.verifier.relay_bench import add_relay_arguments, main_relay
from specrelay.shared.errors import SpecrelayError

from ...conftest import save_tiny_llama


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
        assert set(methods) == {"full_prefill", "naive_reuse", "cacheblend", "relaycaching"}
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
    printed = capsys.readouterr().out
    assert "relay span 96 tokens" in printed and "relaycaching" in printed and "goal reuse_rate >= 0.8" in printed
    assert set(report["goals"]) == {"reuse_rate >= 0.8", "ttft_speedup >= 3 (longest span)",
                                    "greedy_agreement >= 0.95 and above naive reuse"}


@pytest.mark.parametrize("argv, message", [
    (("--spans", "64,x"), "comma-separated integers"),
    (("--pipelines", "0"), "must be positive"),
    (("--spans", "4000"), "past the model's"),
])
def test_user_mistakes_are_one_line_errors(model_dir, argv, message):
    with pytest.raises(SpecrelayError, match=message):
        main_relay(parse("--model", str(model_dir), "--quick", *argv))


def test_missing_model_names_the_fix(tmp_path):
    with pytest.raises(SpecrelayError, match="specrelay models train"):
        main_relay(parse("--model", str(tmp_path / "nothing")))
