"""Relay-aware prefill on a model with sliding-window attention: the recompute honours the window, so recomputing
every relayed token is exactly the model's own prefill, and influence counts only attention the window allows."""

from __future__ import annotations

import pytest
import torch

from specrelay.services.verifier import relay_select
from specrelay.services.verifier.relay import PlacedSpan, RelayConfig, relay_prefill
from specrelay.shared.modeling.kv_cache import BlockTable
from specrelay.shared.modeling.loader import load_model
from specrelay.shared.modeling.runner import ModelRunner

from .relay_helpers import greedy_after, upstream_decode

WINDOW = 8


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    from transformers import AutoModelForCausalLM, MistralConfig

    torch.manual_seed(6)
    config = MistralConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                           initializer_range=0.2, sliding_window=WINDOW)  # fmt: skip
    path = tmp_path_factory.mktemp("relay-window")
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return ModelRunner(load_model(path), num_blocks=64, prefill_chunk=4096)


@pytest.mark.parametrize("config", [RelayConfig(method="cacheblend", recompute_ratio=1.0),
                                    RelayConfig(method="relaycaching", deviation_factor=0.0, influence_layers="all")])
def test_full_recompute_is_exactly_the_windowed_prefill(runner, config):
    gen = torch.Generator().manual_seed(11)
    out, span = upstream_decode(runner, torch.randint(0, 101, (12,), generator=gen).tolist(), 30, seed=3)
    prefix, suffix = torch.randint(0, 101, (17,), generator=gen).tolist(), [5, 6, 7]
    prompt = prefix + out + suffix
    ref_table, table = BlockTable(), BlockTable()
    try:
        ref_logits = runner.prefill(ref_table, prompt)
        got = relay_prefill(runner.model, runner.cache, table, prompt, [PlacedSpan(len(prefix), span)], config)
        assert got.num_recomputed_tokens == len(span)
        assert torch.equal(got.logits[-1], ref_logits)
        assert greedy_after(runner, table, got.logits[-1], 12) == greedy_after(runner, ref_table, ref_logits, 12)
    finally:
        runner.release(table)
        runner.release(ref_table)


def test_influence_is_zero_outside_the_window():
    gen = torch.Generator().manual_seed(0)
    q, keys = torch.randn(3, 4, 8, generator=gen), torch.randn(20, 2, 8, generator=gen)
    query_positions, key_positions = torch.tensor([17, 18, 19]), torch.arange(20)
    score = relay_select.influence(q, keys, query_positions, key_positions, 8**-0.5, sliding_window=WINDOW)
    assert torch.all(score[: 17 - WINDOW + 1] == 0) and torch.all(score[17 - WINDOW + 1 :] > 0)
    assert torch.all(relay_select.influence(q, keys, query_positions, key_positions, 8**-0.5) > 0)
    assert score.sum().item() == pytest.approx(1.0)


@pytest.mark.parametrize("config", [RelayConfig(method="cacheblend", recompute_ratio=0.3),
                                    RelayConfig(method="naive", recompute_first=4)])
def test_the_kernel_path_reads_the_same_row_subset_batch(runner, config, monkeypatch):
    """Relay prefill runs the model's own layers, so on CUDA its attention is the tree-attention kernel: the batch of
    a row subset (span rows stopped past the check layer) must mean to the kernel what it means to the torch path.
    The kernel's torch reference stands in for it here."""
    from specrelay.kernels import tree_attention
    from specrelay.shared.modeling import llama

    gen = torch.Generator().manual_seed(5)
    out, span = upstream_decode(runner, torch.randint(0, 101, (12,), generator=gen).tolist(), 30, seed=4)
    prompt = torch.randint(0, 101, (9,), generator=gen).tolist() + out + [5, 6, 7]
    spans = [PlacedSpan(9, span)]
    results = []
    for kernel in (False, True):
        monkeypatch.setattr(llama, "runtime_uses_triton", lambda *tensors, kernel=kernel: kernel)
        monkeypatch.setattr(tree_attention, "use_triton", lambda *tensors: False)
        table = BlockTable()
        try:
            results.append(relay_prefill(runner.model, runner.cache, table, prompt, spans, config))
        finally:
            runner.release(table)
    torch_path, kernel_path = results
    assert 0 < torch_path.num_reused_tokens < len(span)  # a real row subset past the check layer
    assert kernel_path.selected_rows == torch_path.selected_rows
    torch.testing.assert_close(kernel_path.logits, torch_path.logits, atol=1e-4, rtol=1e-4)
