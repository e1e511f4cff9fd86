"""Relay prefill on the default served model (SmolLM2-135M-Instruct, 30 layers, grouped-query attention): with
every relayed token recomputed it is a full prefill, bit for bit — logits, every layer's K/V, and the answer."""

from __future__ import annotations

import pytest
import torch

from specrelay.bench.relay_pipeline import PLANNER, WORKER, Texts
from specrelay.models.resolve import DEFAULT_MODEL, resolve_model
from specrelay.services.verifier.relay import PlacedSpan, RelayConfig, relay_prefill
from specrelay.shared.modeling.kv_cache import BlockTable
from specrelay.shared.modeling.loader import load_model
from specrelay.shared.modeling.runner import ModelRunner

from .relay_helpers import greedy_after, upstream_decode


@pytest.fixture(scope="module")
def smollm2():
    model_dir = resolve_model(DEFAULT_MODEL)
    model = load_model(model_dir)
    runner = ModelRunner(model, num_blocks=32, prefill_chunk=4096)
    texts = Texts(model_dir, model.config.vocab_size, set())
    upstream = texts.chat(PLANNER, [], lead="Ana", topic="solar panels")
    plan, span = upstream_decode(runner, upstream, 32, seed=3)
    prompt = texts.chat(WORKER, [plan])  # the plan quoted after the worker's own instructions
    start = next(i for i in range(len(prompt)) if prompt[i : i + len(plan)] == plan)
    assert start > 10 and start + len(plan) < len(prompt)
    return runner, prompt, PlacedSpan(start, span)


def kv_rows(runner, table, num_tokens):
    bs = runner.cache.block_size
    slots = torch.tensor([table.blocks[p // bs] * bs + p % bs for p in range(num_tokens)])
    return [c.view(c.shape[0], -1, *c.shape[3:])[:, slots] for c in (runner.cache.k, runner.cache.v)]


@pytest.mark.parametrize("config", [RelayConfig(method="cacheblend", recompute_ratio=1.0),
                                    RelayConfig(method="relaycaching", deviation_factor=0.0, check_layers=(1, 4))])
def test_full_recompute_is_a_full_prefill_bit_for_bit(smollm2, config):
    runner, prompt, placed = smollm2
    ref_table, table = BlockTable(), BlockTable()
    try:
        ref_logits = runner.prefill(ref_table, prompt)
        got = relay_prefill(runner.model, runner.cache, table, prompt, [placed], config)
        assert got.num_span_tokens == 32 and got.reuse_rate == 0.0 and got.num_reused_kv == 0
        assert torch.equal(got.logits[-1], ref_logits)
        for mine, ref in zip(kv_rows(runner, table, len(prompt)), kv_rows(runner, ref_table, len(prompt))):
            assert torch.equal(mine, ref)
        assert greedy_after(runner, table, got.logits[-1], 3) == greedy_after(runner, ref_table, ref_logits, 3)
    finally:
        runner.release(table)
        runner.release(ref_table)
