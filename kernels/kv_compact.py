"""KV compaction after acceptance: move the accepted path's K/V from their tree slots into the contiguous slots
that follow the committed context, in every layer, in place.

The accepted nodes sit at increasing tree positions and move down to consecutive positions (dst[i] <= src[i],
both increasing), so source and destination sets overlap. Read-before-write keeps that correct: the reference
gathers every source row before writing; the kernel reads a chunk of rows, waits for the whole program
(barrier), then writes them, chunk after chunk in order. A later chunk's sources are never an earlier chunk's
destinations, because dst[i] <= src[i] < src[j] for j > i; within one chunk (64 rows, more than a tree's
accepted path) any overlap at all is safe.
"""

from __future__ import annotations

import functools

import torch

from specrelay.kernels.dispatch import interpret_enabled, load_triton, next_power_of_2, use_triton

tl = None  # triton.language, bound by _build() on first use


def kv_compact_(
    k_cache: torch.Tensor,  # [num_layers, num_blocks, block_size, num_kv_heads, head_dim], in place
    v_cache: torch.Tensor,  # [num_layers, num_blocks, block_size, num_kv_heads, head_dim], in place
    src_slots: torch.Tensor,  # [n] int64
    dst_slots: torch.Tensor,  # [n] int64
) -> None:
    if use_triton(k_cache, v_cache):
        kv_compact_triton_(k_cache, v_cache, src_slots, dst_slots)
    else:
        kv_compact_reference_(k_cache, v_cache, src_slots, dst_slots)


def kv_compact_reference_(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    src_slots: torch.Tensor,  # [n] int64
    dst_slots: torch.Tensor,  # [n] int64
) -> None:
    for cache in (k_cache, v_cache):
        num_layers, num_blocks, block_size, num_kv_heads, head_dim = cache.shape
        flat = cache.view(num_layers, num_blocks * block_size, num_kv_heads, head_dim)
        flat.index_copy_(1, dst_slots, flat.index_select(1, src_slots))  # the gather copies first


def kv_compact_triton_(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    src_slots: torch.Tensor,  # [n] int64
    dst_slots: torch.Tensor,  # [n] int64
    block_rows: int = 64,
    block_cols: int = 64,
) -> None:
    num_layers, num_blocks, block_size, num_kv_heads, head_dim = k_cache.shape
    n = src_slots.numel()
    assert v_cache.shape == k_cache.shape and v_cache.dtype == k_cache.dtype
    assert src_slots.shape == dst_slots.shape == (n,) and src_slots.dtype == dst_slots.dtype == torch.int64
    for cache in (k_cache, v_cache):
        assert cache.stride(-1) == 1 and cache.stride(-2) == head_dim, "each slot's [heads, head_dim] contiguous"
    assert k_cache.stride() == v_cache.stride()
    if n == 0:
        return
    row_width = num_kv_heads * head_dim
    block_cols = min(block_cols, next_power_of_2(row_width))
    grid = (num_layers, -(-row_width // block_cols))
    _build(interpret_enabled())[grid](
        k_cache, v_cache, src_slots, dst_slots, n,
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_size, row_width,
        BLOCK_N=min(block_rows, next_power_of_2(n)), BLOCK_C=block_cols,
    )  # fmt: skip


@functools.cache
def _build(interpret: bool):
    global tl
    triton, tl = load_triton()

    @triton.jit
    def kv_compact_kernel(
        k_ptr, v_ptr, src_ptr, dst_ptr, n,
        stride_l, stride_b, stride_s, block_size, row_width,
        BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
    ):  # fmt: skip
        layer = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        col_ok = cols < row_width
        rows = tl.arange(0, BLOCK_N)
        k_layer = k_ptr + layer * stride_l
        v_layer = v_ptr + layer * stride_l
        for start in range(0, n, BLOCK_N):
            row_ok = start + rows < n
            src = tl.load(src_ptr + start + rows, mask=row_ok, other=0)
            dst = tl.load(dst_ptr + start + rows, mask=row_ok, other=0)
            src_off = ((src // block_size) * stride_b + (src % block_size) * stride_s)[:, None] + cols[None, :]
            dst_off = ((dst // block_size) * stride_b + (dst % block_size) * stride_s)[:, None] + cols[None, :]
            ok = row_ok[:, None] & col_ok[None, :]
            k = tl.load(k_layer + src_off, mask=ok)
            v = tl.load(v_layer + src_off, mask=ok)
            tl.debug_barrier()  # every source row of the chunk is read before any destination is written
            tl.store(k_layer + dst_off, k, mask=ok)
            tl.store(v_layer + dst_off, v, mask=ok)
            tl.debug_barrier()

    return kv_compact_kernel
