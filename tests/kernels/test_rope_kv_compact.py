"""RoPE shift and KV compaction, kernel (interpreted) against reference, and both against what the cache should
hold afterwards."""

from __future__ import annotations

import pytest
import torch

from specrelay.kernels.kv_compact import kv_compact_, kv_compact_reference_, kv_compact_triton_
from specrelay.kernels.rope_shift import rope_shift_, rope_shift_reference_, rope_shift_triton_
from specrelay.shared.modeling.rope import rope_cos_sin, rotate_half

NUM_LAYERS, NUM_BLOCKS, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM = 3, 12, 4, 2, 16


def inv_freq(head_dim=HEAD_DIM, base=10000.0):
    return 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)


def rotate(x, positions):  # x [n, heads, head_dim] rotated to positions [n]
    cos, sin = rope_cos_sin(inv_freq(), positions, torch.float32)
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


IMPLS = {"ids": ["ref", "kernel", "auto"]}


def slot_view(cache):  # [num_layers, num_slots, num_kv_heads, head_dim]
    return cache.view(cache.shape[0], -1, *cache.shape[3:])


@pytest.mark.parametrize("impl", [rope_shift_reference_, rope_shift_triton_, rope_shift_], **IMPLS)
def test_shifted_keys_equal_keys_rotated_at_new_positions(impl):
    gen = torch.Generator().manual_seed(0)
    raw = torch.randn(NUM_LAYERS, NUM_BLOCKS * BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, generator=gen)
    old_pos = torch.randint(0, 40, (NUM_BLOCKS * BLOCK_SIZE,), generator=gen)
    cache = torch.stack([rotate(raw[layer], old_pos) for layer in range(NUM_LAYERS)])
    cache = cache.view(NUM_LAYERS, NUM_BLOCKS, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM).contiguous()
    before = cache.clone()
    slots = torch.tensor([0, 3, 4, 5, 11, 12, 30, 47])  # across block boundaries, first and last slot
    new_pos = torch.randint(0, 60, (slots.numel(),), generator=gen)
    impl(cache, slots, new_pos - old_pos[slots], inv_freq())
    flat, flat_before = slot_view(cache), slot_view(before)
    for layer in range(NUM_LAYERS):
        torch.testing.assert_close(flat[layer, slots], rotate(raw[layer, slots], new_pos), atol=1e-5, rtol=0)
    untouched = torch.ones(flat.shape[1], dtype=torch.bool)
    untouched[slots] = False
    assert torch.equal(flat[:, untouched], flat_before[:, untouched])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_kernel_matches_reference(dtype):
    gen = torch.Generator().manual_seed(1)
    cache = torch.randn(NUM_LAYERS, NUM_BLOCKS, BLOCK_SIZE, 3, 32, generator=gen).to(dtype)  # 3 heads: masked lanes
    slots = torch.randperm(NUM_BLOCKS * BLOCK_SIZE, generator=gen)[:10]
    delta = torch.randint(-500, 500, (10,), generator=gen)
    want, got = cache.clone(), cache.clone()
    rope_shift_reference_(want, slots, delta, inv_freq(32))
    rope_shift_triton_(got, slots, delta, inv_freq(32))
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    rope_shift_triton_(got, slots[:0], delta[:0], inv_freq(32))  # nothing to move: a no-op
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)


def accepted_path_slots(gen, n, tree_len, start):
    """An accepted path: n increasing tree positions among tree_len, moved to start, start+1, ..."""
    src = start + torch.sort(torch.randperm(tree_len, generator=gen)[:n]).values
    return src, start + torch.arange(n)


@pytest.mark.parametrize("n,tree_len,start", [(1, 1, 0), (4, 9, 3), (7, 20, 13), (100, 130, 5)])
@pytest.mark.parametrize("impl", [kv_compact_reference_, kv_compact_triton_, kv_compact_], **IMPLS)
def test_compaction_moves_the_accepted_path(impl, n, tree_len, start):
    gen = torch.Generator().manual_seed(n)
    num_blocks = (start + tree_len) // BLOCK_SIZE + 2
    shape = (NUM_LAYERS, num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    k, v = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    k0, v0 = k.clone(), v.clone()
    src, dst = accepted_path_slots(gen, n, tree_len, start)
    impl(k, v, src, dst)
    for cache, orig in ((k, k0), (v, v0)):
        flat, flat0 = slot_view(cache), slot_view(orig)
        assert torch.equal(flat[:, dst], flat0[:, src])
        rest = torch.ones(flat.shape[1], dtype=torch.bool)
        rest[dst] = False
        assert torch.equal(flat[:, rest], flat0[:, rest])


def test_compaction_any_overlap_within_a_chunk():
    # a permutation of slots (a cycle): correct only if every row is read before any is written
    gen = torch.Generator().manual_seed(3)
    shape = (2, 4, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    k, v = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    k_orig, k_ref, v_ref = k.clone(), k.clone(), v.clone()
    src, dst = torch.tensor([2, 5, 9, 14]), torch.tensor([5, 9, 14, 2])
    kv_compact_reference_(k_ref, v_ref, src, dst)
    kv_compact_triton_(k, v, src, dst)
    assert torch.equal(slot_view(k)[:, dst], slot_view(k_orig)[:, src])
    assert torch.equal(k, k_ref) and torch.equal(v, v_ref)


def test_compaction_bf16_bit_exact():
    shape = (2, 6, BLOCK_SIZE, 3, 8)
    k = torch.randn(shape).bfloat16()
    v = torch.randn(shape).bfloat16()
    k_ref, v_ref = k.clone(), v.clone()
    src, dst = torch.tensor([7, 9, 10]), torch.tensor([6, 7, 8])
    kv_compact_reference_(k_ref, v_ref, src, dst)
    kv_compact_triton_(k, v, src, dst)
    assert torch.equal(k, k_ref) and torch.equal(v, v_ref)
