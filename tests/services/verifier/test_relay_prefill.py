"""Relay-aware prefill on a tiny random Llama: exactness at full recompute, the RoPE re-rotation, the accounting
users see in usage, and that selective recompute moves the result toward the full prefill."""

from __future__ import annotations

import math

import pytest
import torch

from specrelay.kernels.rope_shift import rope_shift_
from specrelay.services.verifier import relay_select
from specrelay.services.verifier.relay import PlacedSpan, RelayConfig, relay_prefill
from specrelay.shared.errors import ConfigError
from specrelay.shared.modeling.kv_cache import BlockTable
from specrelay.shared.modeling.loader import load_model
from specrelay.shared.modeling.rope import apply_rope, inv_frequencies, rope_cos_sin
from specrelay.shared.modeling.runner import ModelRunner

from ...conftest import save_tiny_llama
from .relay_helpers import LLAMA3_SCALING, greedy_after, upstream_decode

NUM_LAYERS = 4


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    model = load_model(save_tiny_llama(tmp_path_factory.mktemp("relay"), seed=5, num_hidden_layers=NUM_LAYERS,
                                       rope_scaling=LLAMA3_SCALING))
    return ModelRunner(model, num_blocks=128, prefill_chunk=4096)


@pytest.fixture(scope="module")
def pipeline(runner):
    """Agent A writes 80 tokens after its own prompt; agent B's prompt quotes them after a different prefix."""
    gen = torch.Generator().manual_seed(11)
    prompt_a = torch.randint(0, 101, (24,), generator=gen).tolist()
    out, span = upstream_decode(runner, prompt_a, 81, seed=3)
    prefix_b = torch.randint(0, 101, (37,), generator=gen).tolist()
    suffix_b = torch.randint(0, 101, (9,), generator=gen).tolist()
    prompt_b = prefix_b + out + suffix_b
    return prompt_a, out, span, prompt_b, len(prefix_b)


def full_prefill(runner, prompt):
    table = BlockTable()
    return table, runner.prefill(table, prompt)


def kv_of(runner, table, num_tokens):
    bs = runner.cache.block_size
    slots = torch.tensor([table.blocks[p // bs] * bs + p % bs for p in range(num_tokens)])
    flat = lambda c: c.view(c.shape[0], -1, *c.shape[3:])[:, slots]  # noqa: E731
    return flat(runner.cache.k), flat(runner.cache.v)


@pytest.mark.parametrize("config", [RelayConfig(method="cacheblend", recompute_ratio=1.0),
                                    RelayConfig(method="relaycaching", deviation_factor=0.0),
                                    # the probe pass writes K/V before the prefill: none of it may survive
                                    RelayConfig(method="relaycaching", deviation_factor=0.0, influence_layers="all"),
                                    RelayConfig(method="cacheblend", recompute_ratio=1.0, check_layers=(0, 2)),
                                    RelayConfig(select="top", recompute_ratio=1.0, influence_layers="all")])
def test_full_recompute_is_exactly_a_full_prefill(runner, pipeline, config):
    _, _, span, prompt_b, start = pipeline
    ref_table, ref_logits = full_prefill(runner, prompt_b)
    table = BlockTable()
    try:
        got = relay_prefill(runner.model, runner.cache, table, prompt_b, [PlacedSpan(start, span)], config)
        assert got.reuse_rate == 0.0 and got.num_recomputed_tokens == len(span) and got.num_reused_kv == 0
        assert torch.equal(got.logits[-1], ref_logits)
        ref_k, ref_v = kv_of(runner, ref_table, len(prompt_b))
        k, v = kv_of(runner, table, len(prompt_b))
        assert torch.equal(k, ref_k) and torch.equal(v, ref_v)
        assert table.num_tokens == len(prompt_b)
        assert greedy_after(runner, table, got.logits[-1], 12) == greedy_after(runner, ref_table, ref_logits, 12)
    finally:
        runner.release(table)
        runner.release(ref_table)


def test_relayed_keys_land_rotated_at_their_new_positions(runner, pipeline):
    """Layer 0's K/V depend on the token and its position only, so after the re-rotation the relayed layer-0 keys
    must equal what a fresh prefill computes at the new positions (the paper's relative-position storage)."""
    _, _, span, prompt_b, start = pipeline
    ref_table, _ = full_prefill(runner, prompt_b)
    table = BlockTable()
    try:
        got = relay_prefill(runner.model, runner.cache, table, prompt_b, [PlacedSpan(start, span)],
                            RelayConfig(method="naive"))
        rows = slice(start, start + len(span))
        k, v = kv_of(runner, table, len(prompt_b))
        ref_k, ref_v = kv_of(runner, ref_table, len(prompt_b))
        assert (k[0, rows] - ref_k[0, rows]).abs().max() <= 1e-5
        assert (v[0, rows] - ref_v[0, rows]).abs().max() <= 1e-5
        # deeper layers keep the upstream context's K/V: that is the deviation the selection exists for
        assert (k[2, rows] - ref_k[2, rows]).abs().max() > 1e-3
        assert got.reuse_rate == 1.0 and got.num_reused_kv == len(span) * NUM_LAYERS
    finally:
        runner.release(table)
        runner.release(ref_table)


def test_rope_shift_equals_rotating_at_the_new_positions():
    """rope_shift_ in a paged cache, llama3 scaling: within 1e-5 of recomputing RoPE at the new positions. Far
    out, fp32 angles themselves are coarse (ulp(3000 rad) ~ 2.4e-4), so there the shift must add no more error than
    the fp32 rotations it composes: err(old) + err(|delta|) + err(new), each measured against float64."""
    from specrelay.shared.modeling.config import ModelConfig

    cfg = ModelConfig.from_dict(dict(model_type="llama", vocab_size=8, hidden_size=64, intermediate_size=8,
                                     num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                     rope_scaling=LLAMA3_SCALING))
    inv_freq = inv_frequencies(cfg)
    gen = torch.Generator().manual_seed(0)
    raw = torch.randn(2, 40, 2, 32, generator=gen)  # [num_layers, n, H_kv, D] before RoPE

    def rotate(positions, dtype=torch.float32):
        cos, sin = rope_cos_sin(inv_freq.to(dtype), positions, dtype)
        return torch.stack([apply_rope(raw[i].to(dtype), cos, sin) for i in range(2)])

    def fp32_error(positions):
        return (rotate(positions).double() - rotate(positions, torch.float64)).abs().max().item()

    for old, new in ((torch.arange(40), torch.arange(40) + 97), (torch.arange(40) + 3000, torch.arange(40) + 17),
                     (torch.arange(40) + 5, torch.arange(40) + 3900)):
        cache = torch.zeros(2, 8, 16, 2, 32)  # [num_layers, num_blocks, block_size, H_kv, D]
        slots = torch.randperm(128, generator=gen)[:40]
        cache.view(2, 128, 2, 32)[:, slots] = rotate(old)
        rope_shift_(cache, slots, new - old, inv_freq)
        shifted = cache.view(2, 128, 2, 32)[:, slots]
        if max(old.max(), new.max()) < 200:
            assert (shifted - rotate(new)).abs().max() <= 1e-5
        bound = fp32_error(old) + fp32_error((new - old).abs()) + fp32_error(new) + 1e-6
        assert (shifted.double() - rotate(new, torch.float64)).abs().max().item() <= bound


def test_cacheblend_recomputes_the_top_share_and_relaycaching_a_sparse_set(runner, pipeline):
    _, _, span, prompt_b, start = pipeline
    for config, expected in ((RelayConfig(method="cacheblend", recompute_ratio=0.2), math.ceil(0.2 * len(span))),
                             (RelayConfig(method="relaycaching"), None)):
        table = BlockTable()
        try:
            got = relay_prefill(runner.model, runner.cache, table, prompt_b, [PlacedSpan(start, span)], config)
        finally:
            runner.release(table)
        if expected is not None:
            assert got.num_recomputed_tokens == expected
        assert 0 < got.num_recomputed_tokens < len(span)
        assert all(start <= r < start + len(span) for r in got.selected_rows)
        assert got.num_reused_tokens == len(span) - got.num_recomputed_tokens
        # layers 0..1 are run afresh for every token (check layer 1); layers 2..3 reuse the unselected ones
        assert got.num_reused_kv == got.num_reused_tokens * (NUM_LAYERS - 2)


def test_influence_comes_from_the_prompt_tail_or_each_span_tail(runner, pipeline):
    """With deviation out of play, what is recomputed is what the chosen tail attends to: two different sparse sets
    (the prompt's tail reads the span from 9 tokens past its end; the span's tail reads it from inside)."""
    _, _, span, prompt_b, start = pipeline
    chosen = {}
    for source, layers in (("prompt", "all"), ("prompt", "check"), ("span", "check")):
        table = BlockTable()
        try:
            got = relay_prefill(runner.model, runner.cache, table, prompt_b, [PlacedSpan(start, span)],
                                RelayConfig(deviation_factor=1e9, influence_from=source, influence_layers=layers))
        finally:
            runner.release(table)
        assert 0 < got.num_recomputed_tokens < len(span) // 2
        chosen[source, layers] = set(got.selected_rows)
    assert len({frozenset(c) for c in chosen.values()}) == 3  # the probe's sum over layers picks its own set
    with pytest.raises(ConfigError, match="influence_from"):
        RelayConfig(influence_from="suffix")
    with pytest.raises(ConfigError, match="influence_layers"):
        RelayConfig(influence_layers="deep")


@pytest.mark.parametrize("layers", ["check", "all"])
def test_top_select_recomputes_the_share_by_influence_plus_the_deviation_rule(runner, pipeline, layers):
    """select="top": exactly ceil(r·n) span tokens by influence when the deviation rule is off; with it on, the
    union of that set and what the deviation rule alone picks. (A window of 8 < the 9-token suffix: the probe
    recomputes the prompt's tail rows on top of any rule, and none of them may sit in the span here.)"""
    _, _, span, prompt_b, start = pipeline

    def picked(**kw):
        table = BlockTable()
        try:
            got = relay_prefill(runner.model, runner.cache, table, prompt_b, [PlacedSpan(start, span)],
                                RelayConfig(influence_layers=layers, influence_window=8, **kw))
        finally:
            runner.release(table)
        assert got.num_reused_tokens == len(span) - got.num_recomputed_tokens
        return set(got.selected_rows)

    for ratio in (0.1, 0.3):
        by_influence = picked(select="top", recompute_ratio=ratio, deviation_factor=1e9)
        assert len(by_influence) == math.ceil(ratio * len(span))
        by_deviation = picked(select="threshold", influence_factor=1e9)
        assert picked(select="top", recompute_ratio=ratio) == by_influence | by_deviation
    assert picked(select="top", recompute_ratio=0.1, deviation_factor=1e9) < by_influence  # nested by rank
    with pytest.raises(ConfigError, match="select"):
        RelayConfig(select="best")


def test_top_influence_budget_is_shared_across_spans():
    """Influence is attention from the same queries, so the top share is ranked over all spans together: a span
    the answer does not read gets none of the budget (the deviation rule still runs per span)."""
    influence = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.01, 0.02, 0.03, 0.04])
    span_ids = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    deviation = torch.tensor([0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.9])
    chosen = relay_select.top_influence_select(deviation, influence, span_ids, 0.25, 1e9)
    assert chosen.tolist() == [True, True, False, False, False, False, False, False]
    chosen = relay_select.top_influence_select(deviation, influence, span_ids, 0.25, 2.0)
    assert chosen.tolist() == [True, True, False, False, False, False, False, True]


def test_selective_recompute_is_closer_to_full_prefill_than_naive_reuse(runner, pipeline):
    _, _, span, prompt_b, start = pipeline
    rows = list(range(len(prompt_b) - 8, len(prompt_b)))
    ref_table = BlockTable()
    ref = relay_prefill(runner.model, runner.cache, ref_table, prompt_b, [], logits_rows=rows).logits
    runner.release(ref_table)
    kl = {}
    for name, config in (("naive", RelayConfig(method="naive")),
                         ("cacheblend", RelayConfig(method="cacheblend", recompute_ratio=0.5)),
                         ("relaycaching", RelayConfig(method="relaycaching"))):
        table = BlockTable()
        got = relay_prefill(runner.model, runner.cache, table, prompt_b, [PlacedSpan(start, span)], config,
                            logits_rows=rows).logits
        runner.release(table)
        kl[name] = torch.nn.functional.kl_div(got.log_softmax(-1), ref.log_softmax(-1), log_target=True,
                                              reduction="batchmean").item()
    assert kl["cacheblend"] < kl["naive"] and kl["relaycaching"] < kl["naive"], kl


def test_spans_must_match_the_prompt(runner, pipeline):
    _, out, span, prompt_b, start = pipeline
    with pytest.raises(ValueError, match="does not match"):
        relay_prefill(runner.model, runner.cache, BlockTable(), prompt_b, [PlacedSpan(start + 1, span)])
    with pytest.raises(ConfigError, match="recompute ratio"):
        RelayConfig(recompute_ratio=1.5)
    with pytest.raises(ConfigError, match="method"):
        RelayConfig(method="epic")


def test_a_check_layer_past_the_last_layer_still_selects(runner, pipeline):
    _, _, span, prompt_b, start = pipeline
    table = BlockTable()
    try:
        got = relay_prefill(runner.model, runner.cache, table, prompt_b, [PlacedSpan(start, span)],
                            RelayConfig(method="cacheblend", recompute_ratio=0.2, check_layers=(9,)))
    finally:
        runner.release(table)
    assert got.num_recomputed_tokens == math.ceil(0.2 * len(span))
    assert got.num_reused_kv == 0  # every layer up to and including the last ran afresh for every token


def test_a_prompt_ending_inside_a_span_recomputes_its_last_token(runner, pipeline):
    _, out, span, prompt_b, start = pipeline
    prompt = prompt_b[: start + len(span)]  # the quote is the end of the prompt
    table = BlockTable()
    try:
        got = relay_prefill(runner.model, runner.cache, table, prompt, [PlacedSpan(start, span)],
                            RelayConfig(method="naive"))
    finally:
        runner.release(table)
    assert got.num_recomputed_tokens == 1 and got.selected_rows == [len(prompt) - 1]
    assert got.num_reused_kv == (len(span) - 1) * NUM_LAYERS


def test_epic_recomputes_each_span_head_in_every_layer(runner, pipeline):
    """EPIC = naive reuse but the first tokens of each span recomputed: those rows' K/V are a full prefill's in
    every layer (they attend only to fresh rows), the rest of the span keeps the relayed K/V."""
    _, _, span, prompt_b, start = pipeline
    ref_table, _ = full_prefill(runner, prompt_b)
    table = BlockTable()
    try:
        got = relay_prefill(runner.model, runner.cache, table, prompt_b, [PlacedSpan(start, span)],
                            RelayConfig(method="naive", recompute_first=16))
        assert got.selected_rows == list(range(start, start + 16)) and got.num_recomputed_tokens == 16
        assert got.num_reused_kv == (len(span) - 16) * NUM_LAYERS
        k, v = kv_of(runner, table, len(prompt_b))
        ref_k, ref_v = kv_of(runner, ref_table, len(prompt_b))
        head, rest = slice(start, start + 16), slice(start + 16, start + len(span))
        assert (k[:, head] - ref_k[:, head]).abs().max() <= 1e-4 and (v[:, head] - ref_v[:, head]).abs().max() <= 1e-4
        assert (v[2:, rest] - ref_v[2:, rest]).abs().max() > 1e-3
    finally:
        runner.release(table)
        runner.release(ref_table)
    with pytest.raises(ConfigError, match="recompute_first"):
        RelayConfig(recompute_first=-1)
    with pytest.raises(ValueError, match="check layers unresolved"):
        relay_prefill(runner.model, runner.cache, BlockTable(), prompt_b, [PlacedSpan(start, span)],
                      RelayConfig(check_layers=None))


def test_the_band_ends_where_deviation_reaches_half_the_deep_layers():
    from specrelay.services.verifier.relay_profile import choose_band

    rising = [0.0, 0.01, 0.02, 0.05, 0.08, 0.1, 0.1, 0.1, 0.1, 0.1] * 1  # 10 layers, deep mean 0.1
    assert choose_band(rising, band_share=0.5, max_band_share=0.5) == [1, 2, 3]  # 0.05 at layer 3
    assert choose_band(rising, band_share=0.5, max_band_share=0.2) == [1]  # capped at a fifth of the layers
    assert choose_band([0.0, 0.2, 0.2, 0.2], band_share=0.5, max_band_share=1.0) == [1]
