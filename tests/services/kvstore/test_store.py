"""Every backend (local, shared memory, Redis): blocks and spans round trip, prefix lookup over a hash chain,
LRU eviction in byte capacity, pins, refusals, statistics."""

from __future__ import annotations

import msgspec
import pytest
import torch

from specrelay.services.kvstore import block_hashes, span_key
from specrelay.shared.wire import KV_BLOCK_LAYOUT, encode_frame, tensor_to_bytes

MODEL = "test-model"
BLOCK_SHAPE = (2, 2, 4, 2, 8)  # [num_layers, 2, block_size, num_kv_heads, head_dim]


def kv_block(seed: int, dtype=torch.float16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(BLOCK_SHAPE, generator=g).to(dtype)


def frame_bytes(kv: torch.Tensor) -> int:
    """What one block costs against the capacity."""
    header, data = tensor_to_bytes(kv, KV_BLOCK_LAYOUT)
    return len(encode_frame(msgspec.msgpack.encode(header), data))


def chain(n: int, salt: int = 0) -> list[bytes]:
    return block_hashes(MODEL, [salt * 1000 + t for t in range(4 * n)], 4)


BLOCK = frame_bytes(kv_block(0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
async def test_put_get_contains_round_trip(make, dtype):
    store = make(100 * BLOCK)
    (key,) = chain(1)
    kv = kv_block(1, dtype)
    assert not await store.contains(key)
    assert await store.get_block(key) is None
    assert await store.put_block(key, kv)
    assert await store.contains(key)
    got = await store.get_block(key)
    assert got.dtype == dtype and torch.equal(got, kv)
    got[0] = 0  # the caller's tensor is its own: the stored block is unchanged
    assert torch.equal(await store.get_block(key), kv)
    stats = await store.stats()
    assert (stats.num_entries, stats.hits, stats.misses, stats.puts) == (1, 2, 1, 1)
    assert stats.used_bytes == frame_bytes(kv)


async def test_longest_prefix_follows_the_chain_and_stops_at_the_first_gap(make):
    store = make(100 * BLOCK)
    hashes = chain(6)
    blocks = [kv_block(i) for i in range(6)]
    await store.put_blocks(hashes[:4], blocks[:4])
    assert await store.longest_prefix(hashes) == 4
    assert await store.longest_prefix(chain(6, salt=1)) == 0
    assert await store.longest_prefix(block_hashes("another-model", list(range(24)), 4)) == 0
    prefix = await store.get_prefix(hashes)
    assert len(prefix) == 4 and all(torch.equal(a, b) for a, b in zip(prefix, blocks))

    assert await store.delete(hashes[1])
    assert await store.longest_prefix(hashes) == 1  # block 2 is useless without block 1
    assert await store.longest_prefix([]) == 0


async def test_least_recently_used_is_evicted_first(make):
    store = make(3 * BLOCK)
    a, b, c, d, e = (chain(1, salt=s)[0] for s in range(5))
    for key in (a, b, c):
        assert await store.put_block(key, kv_block(0))
    await store.get_block(a)  # a is now the most recent: b is the oldest
    assert await store.put_block(d, kv_block(0))
    assert [await store.contains(k) for k in (a, b, c, d)] == [True, False, True, True]
    assert await store.longest_prefix([c]) == 1  # a lookup refreshes too: a is now the oldest
    assert await store.put_block(e, kv_block(0))
    assert [await store.contains(k) for k in (a, c, d, e)] == [False, True, True, True]
    stats = await store.stats()
    assert (stats.evictions, stats.num_entries, stats.used_bytes) == (2, 3, 3 * BLOCK)


async def test_a_chain_is_evicted_from_its_tail_and_a_chain_too_big_keeps_its_head(make):
    store = make(4 * BLOCK)
    hashes = chain(4)
    await store.put_blocks(hashes, [kv_block(i) for i in range(4)])
    await store.put_block(chain(1, salt=7)[0], kv_block(9))
    await store.put_block(chain(1, salt=8)[0], kv_block(9))
    assert await store.longest_prefix(hashes) == 2  # blocks 3 then 2 went; the reusable head stayed

    small = make(2 * BLOCK)
    await small.put_blocks(hashes, [kv_block(i) for i in range(4)])
    assert await small.longest_prefix(hashes) == 2
    assert (await small.stats()).hits == 2  # writing a chain is not a lookup: only this one counted


async def test_pinned_entries_are_never_evicted_and_a_put_that_cannot_fit_is_refused(make):
    store = make(2 * BLOCK)
    a, b, c = (chain(1, salt=s)[0] for s in range(3))
    await store.put_block(a, kv_block(0))
    await store.put_block(b, kv_block(1))
    assert await store.pin(a) and await store.pin(a) and await store.pin(b)
    assert not await store.pin(c)  # absent
    assert not await store.put_block(c, kv_block(2))  # everything is pinned: refused, nothing evicted
    assert await store.contains(a) and await store.contains(b) and not await store.contains(c)
    assert not await store.delete(a)  # pinned

    assert await store.unpin(b)
    assert not await store.unpin(b)  # no pin left
    assert await store.unpin(a)  # one of a's two pins
    assert await store.put_block(c, kv_block(2))  # b (unpinned) goes, a (still pinned) stays
    assert [await store.contains(k) for k in (a, b, c)] == [True, False, True]
    stats = await store.stats()
    assert (stats.num_pinned, stats.rejected, stats.evictions) == (1, 1, 1)

    assert not await store.put_frame(span_key("huge"), b"\0" * (2 * BLOCK + 1))  # larger than the whole store
    assert (await store.stats()).rejected == 2


class SpanHeader(msgspec.Struct):
    producer: str
    start: int
    num_tokens: int


async def test_spans_are_a_separate_key_space_with_replace_semantics(make):
    store = make(100 * BLOCK)
    key = span_key(MODEL, "req-1", 0, 64)
    assert await store.put_span(key, SpanHeader("req-1", 0, 64), b"first")
    assert await store.get_span(key, SpanHeader) == (SpanHeader("req-1", 0, 64), b"first")
    assert await store.put_span(key, SpanHeader("req-1", 0, 64), b"second value")
    assert await store.get_span(key, SpanHeader) == (SpanHeader("req-1", 0, 64), b"second value")
    assert await store.pin(key)
    assert (await store.stats()).num_entries == 1
    assert await store.get_span(span_key(MODEL, "req-2"), SpanHeader) is None


async def test_bad_keys_and_shapes_are_refused(make):
    store = make(10 * BLOCK)
    with pytest.raises(ValueError, match="32-byte digests"):
        await store.put_block(b"short", kv_block(0))
    with pytest.raises(ValueError, match="num_layers, 2, block_size"):
        await store.put_block(chain(1)[0], torch.zeros(2, 3, 4, 2, 8))
