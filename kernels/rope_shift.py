"""Re-rotate cached keys by a position delta, in place: a relayed span's keys move to where the span lands in the
new prompt without recomputing them (RelayCaching, arXiv 2603.13289, stores upstream KV at relative positions).

Keys are stored rotated (HF/neox "rotate_half" RoPE, Su et al., arXiv 2104.09864): each pair (x1[i], x2[i]) of
the two halves is a 2-D vector turned by the angle pos·inv_freq[i]. Rotations about one frequency compose,
R(a)·R(b) = R(a + b), so a key rotated at pos becomes the key at pos + delta under one more rotation by
delta·inv_freq[i]:  x1' = x1·cos θ − x2·sin θ,  x2' = x2·cos θ + x1·sin θ.  inv_freq already carries any rope
scaling (llama3), and the maths runs in fp32 whatever the cache dtype.
"""

from __future__ import annotations

import functools

import torch

from specrelay.kernels.dispatch import interpret_enabled, load_triton, next_power_of_2, use_triton
from specrelay.shared.rotary import rope_cos_sin, rotate_half  # the runtime's RoPE, the one keys carry

tl = None  # triton.language, bound by _build() on first use


def rope_shift_(
    k_cache: torch.Tensor,  # [num_layers, num_blocks, block_size, num_kv_heads, head_dim], rotated in place
    slots: torch.Tensor,  # [n] int64, distinct slots (block * block_size + offset)
    delta: torch.Tensor,  # [n] int64, new_pos - old_pos per slot
    inv_freq: torch.Tensor,  # [head_dim // 2] float32
) -> None:
    if use_triton(k_cache):
        rope_shift_triton_(k_cache, slots, delta, inv_freq)
    else:
        rope_shift_reference_(k_cache, slots, delta, inv_freq)


def rope_shift_reference_(
    k_cache: torch.Tensor,  # [num_layers, num_blocks, block_size, num_kv_heads, head_dim]
    slots: torch.Tensor,  # [n] int64
    delta: torch.Tensor,  # [n] int64
    inv_freq: torch.Tensor,  # [head_dim // 2] float32
) -> None:
    num_layers, num_blocks, block_size, num_kv_heads, head_dim = k_cache.shape
    flat = k_cache.view(num_layers, num_blocks * block_size, num_kv_heads, head_dim)
    cos, sin = rope_cos_sin(inv_freq.float(), delta, torch.float32)  # [n, head_dim]
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    x = flat[:, slots].float()  # [num_layers, n, num_kv_heads, head_dim]
    flat[:, slots] = (x * cos + rotate_half(x) * sin).to(k_cache.dtype)


def rope_shift_triton_(
    k_cache: torch.Tensor,  # [num_layers, num_blocks, block_size, num_kv_heads, head_dim]
    slots: torch.Tensor,  # [n] int64
    delta: torch.Tensor,  # [n] int64
    inv_freq: torch.Tensor,  # [head_dim // 2] float32
) -> None:
    num_layers, num_blocks, block_size, num_kv_heads, head_dim = k_cache.shape
    n = slots.numel()
    assert head_dim % 2 == 0 and inv_freq.shape == (head_dim // 2,) and inv_freq.dtype == torch.float32
    assert slots.shape == delta.shape == (n,) and slots.dtype == delta.dtype == torch.int64
    assert k_cache.stride(-1) == 1, "head_dim must be contiguous"
    if n == 0:
        return
    _build(interpret_enabled())[(n, num_layers)](
        k_cache, slots, delta, inv_freq,
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), k_cache.stride(3), block_size, num_kv_heads,
        HALF=head_dim // 2, BLOCK_H=next_power_of_2(num_kv_heads), BLOCK_HALF=next_power_of_2(head_dim // 2),
    )  # fmt: skip


@functools.cache
def _build(interpret: bool):
    global tl
    triton, tl = load_triton()

    @triton.jit
    def rope_shift_kernel(
        k_ptr, slots_ptr, delta_ptr, inv_freq_ptr,
        stride_l, stride_b, stride_s, stride_h, block_size, num_kv_heads,
        HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
    ):  # fmt: skip
        i = tl.program_id(0)
        layer = tl.program_id(1).to(tl.int64)
        slot = tl.load(slots_ptr + i)
        theta_step = tl.load(delta_ptr + i).to(tl.float32)
        heads = tl.arange(0, BLOCK_H)
        freq_idx = tl.arange(0, BLOCK_HALF)
        freq_ok = freq_idx < HALF
        theta = theta_step * tl.load(inv_freq_ptr + freq_idx, mask=freq_ok, other=0.0)  # [BLOCK_HALF]
        cos = tl.cos(theta)[None, :]
        sin = tl.sin(theta)[None, :]
        base = k_ptr + layer * stride_l + (slot // block_size) * stride_b + (slot % block_size) * stride_s
        x1_ptr = base + heads[:, None] * stride_h + freq_idx[None, :]
        ok = (heads < num_kv_heads)[:, None] & freq_ok[None, :]
        x1 = tl.load(x1_ptr, mask=ok, other=0.0).to(tl.float32)
        x2 = tl.load(x1_ptr + HALF, mask=ok, other=0.0).to(tl.float32)
        tl.store(x1_ptr, (x1 * cos - x2 * sin).to(k_ptr.dtype.element_ty), mask=ok)
        tl.store(x1_ptr + HALF, (x2 * cos + x1 * sin).to(k_ptr.dtype.element_ty), mask=ok)

    return rope_shift_kernel
