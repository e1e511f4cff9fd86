"""The configuration tree (services/config.py): each service's CLI and `specrelay serve` give the same config for the
same flags, serve's gateway is built from its verifier's limits, and a bad value is a CLI error (exit 2, a message
that names the flag) before anything starts."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from specrelay.cli import main
from specrelay.models.resolve import PAIR_DIR
from specrelay.services import config, serve
from specrelay.services.drafter import service as drafter
from specrelay.services.gateway import service as gateway
from specrelay.services.kvstore import service as kvstore
from specrelay.services.toolcoord import service as toolcoord
from specrelay.services.verifier import cli as verifier

TARGET = str(PAIR_DIR / "target")
REDIS = ["--redis", "redis://127.0.0.1:1/0"]  # never reached: configs are built, nothing connects


def parse(add_arguments, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def serve_config(argv: list[str]) -> config.ServeConfig:
    return config.build("serve", parse(serve.add_arguments, ["--model", TARGET, *argv]))


def test_serve_and_the_verifier_alone_read_the_same_flags_the_same_way():
    argv = ["--max-nodes", "6", "--num-blocks", "128", "--device", "cpu", "--no-client-retention", "--relay"]
    embedded = serve_config(argv).verifier
    alone = config.build("verifier", parse(verifier.add_arguments, ["--model", TARGET, *REDIS, *argv]))
    # what each entrypoint decides itself: the bus, and serve's in-process KV reports and tool holds
    deployment = dict(redis=None, report_kv=True, max_hold_s=300.0)
    assert dataclasses.replace(embedded, **deployment) == dataclasses.replace(alone, **deployment)
    assert (alone.max_nodes, alone.num_blocks, alone.client_retention, alone.relay.enabled) == (6, 128, False, True)


def test_serve_and_the_drafter_alone_read_the_same_flags_the_same_way():
    for argv in ([], ["--proposer", "recycle"], ["--proposer", "chain", "--draft", str(PAIR_DIR / "draft")]):
        embedded = serve_config(argv).drafter
        alone = config.build("drafter", parse(drafter.add_arguments, ["--model", TARGET, *REDIS, *argv]))
        assert embedded == dataclasses.replace(alone, redis=None)
    assert serve_config(["--proposer", "chain"]).drafter.proposer == "chain"
    plain = serve_config(["--proposer", "none"])
    assert plain.drafter is None and not plain.verifier.speculate


def test_serve_builds_its_gateway_from_the_verifiers_limits():
    argv = ["--max-running", "8", "--max-model-len", "512", "--schedule", "slo", "--port", "9100"]
    alone = config.build("gateway", parse(gateway.add_arguments, ["--model", TARGET, *argv]))
    assert serve_config(argv).gateway == alone  # within the verifier's limits: the same config
    over = ["--max-running", "1000", "--max-model-len", "1000000"]
    embedded = serve_config(over)
    assert embedded.gateway.gateway.max_running == embedded.verifier.max_batch == 32
    assert embedded.gateway.gateway.max_model_len == 4096  # the pair's max_position_embeddings
    assert config.build("gateway", parse(gateway.add_arguments, ["--model", TARGET, *over])).gateway.max_running == 1000


def test_kvstore_and_toolcoord_configs_come_from_their_flags():
    keeper = config.build("kvstore", parse(kvstore.add_arguments, [*REDIS, "--capacity", "1G", "--port", "8200"]))
    assert (keeper.capacity_bytes, keeper.port) == (1 << 30, 8200)
    coord = config.build("toolcoord", parse(toolcoord.add_arguments, [*REDIS, "--max-concurrent", "3"]))
    assert (coord.redis, coord.max_concurrent) == (REDIS[1], 3)
    for cfg in (serve_config([]), keeper, coord):
        with pytest.raises(dataclasses.FrozenInstanceError):
            cfg.redis = "elsewhere"


@pytest.mark.parametrize("argv, message", [
    (["serve", "--model", TARGET, "--max-nodes", "0"], "max_nodes=0 must be a whole number"),
    (["serve", "--model", TARGET, "--max-running", "0"], "max_running must be >= 1"),
    (["serve", "--model", TARGET, "--num-blocks", "-1"], "num_blocks=-1 must be a whole number"),
    (["gateway", "--model", TARGET, "--port", "70000"], "--port 70000: not a TCP port"),
    (["verifier", "--model", TARGET, *REDIS, "--claim-idle-s", "0"], "claim_idle_s=0.0 must be positive"),
    (["verifier", "--model", TARGET], "needs --redis"),
    (["drafter", "--model", TARGET, *REDIS, "--max-batch-age-s", "0"], "--max-batch-age-s 0.0: must be positive"),
    (["kvstore", *REDIS, "--interval-s", "-1"], "--interval-s -1.0: must be positive"),
    (["toolcoord", *REDIS, "--max-concurrent", "0"], "--max-concurrent 0: must be at least 1"),
])
def test_a_bad_value_is_a_cli_error_before_anything_starts(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"specrelay {argv[0]}: error: ") and message in err, err
