"""Relayed spans through the kvstore: published by the upstream agent, found anywhere in a later prompt (not
only as a prefix), loaded back bit for bit."""

from __future__ import annotations

import pytest
import torch

from specrelay.services.kvstore import make_store
from specrelay.services.verifier.relay import PlacedSpan, RelayConfig, relay_prefill
from specrelay.services.verifier.relay_index import (boundaries, find_spans, lookup_relay, publish_span,
                                                     span_entry_key)
from specrelay.shared.modeling.kv_cache import BlockTable
from specrelay.shared.modeling.loader import load_model
from specrelay.shared.modeling.runner import ModelRunner

from ...conftest import save_tiny_llama
from .relay_helpers import upstream_decode

SPAN_VOCAB = 90  # the upstream agent writes ids < 90; prompts around the quotes use 90..100, so matches end exactly


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    model = load_model(save_tiny_llama(tmp_path_factory.mktemp("relay-index"), seed=8, num_hidden_layers=2))
    return ModelRunner(model, num_blocks=128, prefill_chunk=4096)


def filler(n: int, seed: int) -> list[int]:
    return torch.randint(SPAN_VOCAB, 101, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_chunk_cuts_do_not_depend_on_where_the_text_starts():
    text = torch.randint(0, 1000, (600,), generator=torch.Generator().manual_seed(1)).tolist()
    alone = boundaries(text)
    quoted = boundaries(filler(53, 2) + text)
    assert 600 / 16 / 3 < len(alone) < 600 / 16 * 3  # about one cut per 16 tokens
    assert [c - 53 for c in quoted if c >= 53 + 4] == [c for c in alone if c >= 4]


async def test_a_quoted_sub_span_is_found_at_any_offset_and_loads_exactly(runner):
    out, span = upstream_decode(runner, filler(20, 3), 161, seed=4, max_token=SPAN_VOCAB)
    other, other_span = upstream_decode(runner, filler(20, 5), 101, seed=6, max_token=SPAN_VOCAB)
    store = make_store(None, 1 << 24)
    assert await publish_span(store, "tiny", span) > 0
    assert await publish_span(store, "tiny", other_span) > 0
    # B quotes 130 tokens from the middle of A's output at row 37, then 100 tokens of the second output
    prompt = filler(37, 7) + out[12:142] + filler(11, 8) + other[:100] + filler(6, 9)
    matches = await find_spans(store, "tiny", prompt)
    assert [(m.prompt_start, m.span_begin, m.span_end) for m in matches] == [(37, 12, 142), (178, 0, 100)]
    assert await find_spans(store, "another-model", prompt) == []  # the model id is part of every key

    placed = await lookup_relay(store, "tiny", prompt, runner.model.inv_freq)
    direct = [PlacedSpan(37, span.slice(12, 142, runner.model.inv_freq)), PlacedSpan(178, other_span.slice(0, 100,
                                                                                    runner.model.inv_freq))]
    for got, want in zip(placed, direct):
        assert got.start == want.start and got.kv.token_ids == want.kv.token_ids
        assert torch.equal(got.kv.k, want.kv.k) and torch.equal(got.kv.v, want.kv.v)
    tables = [BlockTable(), BlockTable()]
    try:
        a = relay_prefill(runner.model, runner.cache, tables[0], prompt, placed, RelayConfig())
        b = relay_prefill(runner.model, runner.cache, tables[1], prompt, direct, RelayConfig())
        assert torch.equal(a.logits, b.logits) and a.num_span_tokens == 230
    finally:
        for t in tables:
            runner.release(t)
    await store.close()


async def test_short_quotes_and_unpublished_text_are_not_relayed(runner):
    out, span = upstream_decode(runner, filler(20, 10), 121, seed=11, max_token=SPAN_VOCAB)
    store = make_store(None, 1 << 24)
    await publish_span(store, "tiny", span)
    unpublished = torch.randint(0, SPAN_VOCAB, (120,), generator=torch.Generator().manual_seed(12)).tolist()
    assert await find_spans(store, "tiny", filler(30, 13) + unpublished) == []
    assert await find_spans(store, "tiny", filler(30, 14) + out[40:52] + filler(30, 15)) == []  # 12 < 16 tokens
    quoted = filler(30, 16) + out[:100]
    assert len(await find_spans(store, "tiny", quoted)) == 1
    assert await store.delete(span_entry_key("tiny", list(span.token_ids)))  # evicted: its chunk refs now dangle
    assert await find_spans(store, "tiny", quoted) == []
    assert await lookup_relay(store, "tiny", quoted, runner.model.inv_freq) == []
    await store.close()
