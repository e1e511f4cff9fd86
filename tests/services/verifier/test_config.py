"""The verifier's config: frozen, checked when built, and the same flags give the same config whether the verifier
runs alone (`specrelay verifier`) or inside `specrelay serve`."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from specrelay.services import serve
from specrelay.services.verifier import cli
from specrelay.services.verifier.config import VerifierConfig, from_args
from specrelay.shared.errors import ConfigError


@pytest.mark.parametrize("bad, message", [
    (dict(max_batch=0), "max_batch=0 must be a whole number ≥ 1"),
    (dict(num_blocks=-3), "num_blocks=-3"),
    (dict(max_nodes=2.5), "max_nodes=2.5"),
    (dict(draft_timeout_s=0), "draft_timeout_s=0 must be positive"),
    (dict(max_hold_s=-1.0), "max_hold_s=-1.0 must not be negative"),
    (dict(cancel_replay_s=float("nan")), "cancel_replay_s=nan"),
    (dict(consumer=""), "consumer must name this replica"),
])
def test_a_bad_value_is_refused_when_the_config_is_built(bad, message):
    with pytest.raises(ConfigError, match=message):
        VerifierConfig("", **bad)


def test_the_config_cannot_be_changed_after_it_is_built():
    cfg = VerifierConfig("", max_batch=4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.max_batch = 8
    assert dataclasses.replace(cfg, max_batch=8).max_batch == 8


def parse(add_arguments, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_serve_and_the_stand_alone_verifier_read_the_same_flags_the_same_way():
    argv = ["--max-nodes", "6", "--num-blocks", "128", "--no-client-retention", "--relay", "--relay-min-tokens", "8"]
    alone, embedded = parse(cli.add_arguments, argv), parse(serve.add_arguments, argv)
    assert from_args(alone, "m") == from_args(embedded, "m")
    cfg = from_args(alone, "m")
    assert (cfg.max_nodes, cfg.num_blocks, cfg.client_retention, cfg.relay.enabled, cfg.relay.min_span_tokens) == (
        6, 128, False, True, 8)
    with pytest.raises(ConfigError, match="max_nodes=0"):
        from_args(parse(cli.add_arguments, ["--max-nodes", "0"]), "m")
