"""`specrelay bench engine` on the small pair: the JSON a user reads (every point, the profile split, the verify
curve, the goals), greedy equality with transformers, and a user's bad flag. Never a time."""

from __future__ import annotations

import argparse
import json

import pytest

from specrelay.bench.engine import add_arguments, main
from specrelay.bench.engine_profile import PARTS
from specrelay.models.resolve import PAIR_DIR
from specrelay.shared.errors import ConfigError

TARGET = PAIR_DIR / "target"  # the bench's default is the real model, too slow for the suite
pytestmark = pytest.mark.skipif(not (TARGET / "config.json").is_file(), reason="embedded target not built")


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(["--model", str(TARGET), *argv])


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("engine") / "engine.json"
    assert main(parse("--quick", "--batch-sizes", "1,8", "--prompt-lens", "24,40", "--max-tokens", "9",
                      "--max-verify", "5", "--json", str(out))) == 0
    return json.loads(out.read_text())


def test_every_point_has_the_documented_figures(report):
    assert [(p["prompt_len"], p["batch_size"]) for p in report["points"]] == [(24, 1), (24, 8), (40, 1), (40, 8)]
    for p in report["points"]:
        assert p["tokens_per_s"] > 0 and p["hf_tokens_per_s"] > 0
        assert p["step_ms"] > 0 and p["floor_ms"] > 0 and p["f_linear_floor_ms"] > 0
        assert p["floor_fraction"] == pytest.approx(p["floor_ms"] / p["step_ms"], rel=0.02)
        assert set(p["profile_ms"]) == set(PARTS)
        assert all(v >= 0 for v in p["profile_ms"].values()) and p["profile_ms"]["matmuls"] > 0
        assert p["profile_ms"]["attention"] > 0


def test_plain_decoding_gives_transformers_greedy_tokens(report):
    assert all(p["same_tokens_as_hf"] == 1.0 for p in report["points"])


def test_verify_curve_is_relative_to_one_token(report):
    curve = report["verify_curve"]
    assert curve["m"] == [1, 2, 3, 4, 5] and curve["ratio"][0] == 1.0 and curve["t1_ms"] > 0
    assert curve["context"] == 23 and all(r > 0 for r in curve["ratio"])


def test_goals_name_both_batch_sizes(report):
    assert set(report["goals"]) == {"batch 1: decode >= 1.1x hf_generate", "batch 1: floor_fraction >= 0.7",
                                    "batch 8: decode >= 1.5x hf_generate", "batch 8: floor_fraction >= 0.6"}


@pytest.mark.parametrize("flag", ["--batch-sizes", "--prompt-lens"])
@pytest.mark.parametrize("value", ["8,x", "0", ""])
def test_bad_sizes_are_a_one_line_error(flag, value):
    with pytest.raises(ConfigError, match=flag):
        main(parse(flag, value))
