"""The verifier's side of a relay: publish a finished output, admit a later prompt that quotes it (after a prefix
hit too), settings from the command line, counters for usage and /metrics."""

from __future__ import annotations

import argparse

import pytest
import torch

from specrelay.services.kvstore import make_store
from specrelay.services.verifier.relay import RelayConfig, relay_prefill
from specrelay.services.verifier.relay_hooks import (RelayCounters, add_relay_options, publish_output, relay_admit,
                                                     relay_config)
from specrelay.shared.errors import ConfigError
from specrelay.shared.modeling.kv_cache import BlockTable
from specrelay.shared.modeling.loader import load_model
from specrelay.shared.modeling.runner import ModelRunner, StepInput

from ...conftest import save_tiny_llama


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    model = load_model(save_tiny_llama(tmp_path_factory.mktemp("relay-hooks"), seed=19, num_hidden_layers=3))
    return ModelRunner(model, num_blocks=128, prefill_chunk=4096)


def finished_request(runner, prompt, num_tokens):
    """A request as the engine leaves it at finish: every output token but the last has K/V in the table."""
    table = BlockTable()
    logits = runner.prefill(table, prompt)
    out = [int(logits.argmax())]
    for _ in range(num_tokens - 1):
        out.append(int(runner.forward([StepInput(table, [out[-1]])])[0][-1].argmax()))
    return table, out


async def test_publish_on_finish_then_admit_a_quoting_prompt_after_a_prefix_hit(runner):
    store, counters = make_store(None, 1 << 24), RelayCounters()
    prompt_a = list(range(70, 95))
    table_a, out = finished_request(runner, prompt_a, 90)
    assert table_a.num_tokens == len(prompt_a) + 89
    assert await publish_output(runner, store, "m", table_a, len(prompt_a), out, counters) == 89
    runner.release(table_a)

    prompt_b = [96, 97, 98, 99] * 5 + out + [100, 99, 98]
    table = BlockTable()
    runner.prefill(table, prompt_b[:8])  # a prefix-cache hit filled the first 8 tokens
    got = await relay_admit(runner, store, "m", table, prompt_b, RelayConfig(enabled=True), counters)
    assert got is not None and got.num_prompt_tokens == len(prompt_b) - 8
    assert got.num_span_tokens == 89 and table.num_tokens == len(prompt_b)
    assert counters.requests_relayed == 1 and counters.reused_tokens + counters.recomputed_tokens == 89
    assert counters.spans_published == 1 and counters.tokens_published == 89
    metrics = counters.prometheus()
    assert f"specrelay_relay_reused_tokens_total {float(got.num_reused_tokens)}\n" in metrics

    # the same admit with full recompute equals a plain prefill of the same tokens after the same prefix
    exact_table, ref_table = BlockTable(), BlockTable()
    runner.prefill(exact_table, prompt_b[:8])
    exact = await relay_admit(runner, store, "m", exact_table, prompt_b,
                              RelayConfig(enabled=True, method="cacheblend", recompute_ratio=1.0))
    runner.prefill(ref_table, prompt_b[:8])
    ref = relay_prefill(runner.model, runner.cache, ref_table, prompt_b[8:], [])
    assert torch.equal(exact.logits, ref.logits)
    for t in (table, exact_table, ref_table):
        runner.release(t)

    off = BlockTable()
    assert await relay_admit(runner, store, "m", off, prompt_b, RelayConfig(enabled=False)) is None
    nothing_quoted = [96, 97] * 40
    assert await relay_admit(runner, store, "m", off, nothing_quoted, RelayConfig(enabled=True)) is None
    assert off.num_tokens == 0 and off.blocks == []
    await store.close()


def test_a_verifier_checks_over_the_band_cached_for_its_model(runner, tmp_path, monkeypatch):
    from specrelay.services.verifier import relay_profile
    from specrelay.services.verifier.relay_hooks import VerifierRelay

    monkeypatch.setenv("SPECRELAY_CACHE_DIR", str(tmp_path))
    store = make_store(None, 1 << 20)
    assert VerifierRelay(runner, store, "tiny:abc", RelayConfig(enabled=True, check_layers=None)).config.check_layers \
        == (1,)  # nothing measured yet: layer 1
    profile = relay_profile.LayerProfile("tiny", 3, [64], 1, 16, [0.0, 0.1, 0.2], [0.0, 0.1, 0.2], [0.0] * 3,
                                         [0.0] * 3, check_layers=[1, 2], recompute_first=16)
    relay_profile.save(profile, relay_profile.profile_path("tiny:abc"))
    relay = VerifierRelay(runner, store, "tiny:abc", RelayConfig(enabled=True, check_layers=None))
    assert relay.config.check_layers == (1, 2) and relay.config.recompute_first == 16
    assert VerifierRelay(runner, store, "tiny:abc", RelayConfig(enabled=True)).config.check_layers == (1,)


async def test_short_outputs_are_not_published(runner):
    store = make_store(None, 1 << 20)
    table, out = finished_request(runner, list(range(10, 30)), 10)
    assert await publish_output(runner, store, "m", table, 20, out) == 0
    assert (await store.stats()).num_entries == 0
    runner.release(table)
    await store.close()


def test_settings_from_the_command_line():
    parser = argparse.ArgumentParser()
    add_relay_options(parser)
    cfg = relay_config(parser.parse_args(["--relay", "--relay-method", "cacheblend", "--relay-recompute-ratio", "0.3",
                                          "--relay-check-layers", "1,2"]))
    assert (cfg.enabled, cfg.method, cfg.recompute_ratio, cfg.check_layers) == (True, "cacheblend", 0.3, (1, 2))
    assert relay_config(parser.parse_args(["--no-relay"])).enabled is False
    # off unless asked for: `specrelay serve` and `specrelay verifier` reuse exact prefixes only by default
    assert relay_config(parser.parse_args([])).enabled is False
    assert relay_config(parser.parse_args(["--relay-method", "naive"])).enabled is False
    cfg = relay_config(parser.parse_args(["--relay-select", "top", "--relay-recompute-ratio", "0.2"]))
    assert (cfg.method, cfg.select, cfg.recompute_ratio) == ("relaycaching", "top", 0.2)
    assert relay_config(parser.parse_args([])).select == "threshold"
    # the check band comes from the model's layer profile unless given; EPIC's head is opt-in
    assert relay_config(parser.parse_args(["--relay"])).check_layers is None
    assert relay_config(parser.parse_args(["--relay-recompute-first", "16"])).recompute_first == 16
    with pytest.raises(ConfigError, match="check-layers"):
        relay_config(parser.parse_args(["--relay-check-layers", "one"]))
    with pytest.raises(ConfigError, match="recompute ratio"):
        relay_config(parser.parse_args(["--relay-recompute-ratio", "2"]))
