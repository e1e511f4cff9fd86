"""Tree attention over a paged KV cache: the verifier's attention for tree verification, prefill and decode.

Every request in the batch brings a ragged run of new tokens (the nodes of its draft tree, a prompt chunk, or one
decode token) whose K/V are already written into the block cache. New token i of request s sits at position
context_lens[s] + i; it sees every cached position before context_lens[s], and new token j of its own request iff
tree_mask[i, j] (its ancestors and itself; SpecInfer, arXiv 2305.09781, "tree-based parallel decoding"). No mask
means causal (j <= i), so prefill and decode are the same kernel. A drafter growing its tree over several forwards
has earlier tree levels in the cache already: `mask_starts[s]` moves the mask's first column back to that cached
key position, and every key from there on is visible only through the mask.

The kernel is FlashAttention's online softmax (Dao et al., arXiv 2205.14135) over key blocks gathered through the
block table (vLLM's PagedAttention, arXiv 2309.06180): for each key block, m' = max(m, rowmax(S)),
l' = l·2^(m−m') + Σ 2^(S−m'), acc' = acc·2^(m−m') + 2^(S−m')·V, with S in log2 units (scale·log2 e folded in).
One program owns one kv head and a block of queries of one request, with all GROUP query heads that share that kv
head stacked as rows, so each K/V tile is read once per group (GQA, arXiv 2305.13245). With few requests the
keys are also split across programs and the partial softmaxes merged after (split-KV, as in flash-decoding).

Sliding window w (Mistral; transformers shows key position j to query position i iff i - w < j <= i): a query at
position p sees only the keys at positions p-w+1 .. p. Keys before the mask start (every key, without a mask) sit
at their cache index, so they are cut by position here. Keys from the mask start on are tree nodes, whose cache
index is not their position; `window_mask` cuts the mask itself, once per forward, and the kernel only reads it.
The kernel starts its key loop at the window's first key, so a windowed layer reads O(w) keys, not the whole cache.
"""

from __future__ import annotations

import functools
import math

import torch

from specrelay.kernels.dispatch import interpret_enabled, load_triton, next_power_of_2, use_triton

tl = None  # triton.language, bound by _build() on first use: importing this module leaves triton alone


def tree_attention(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int32
    context_lens: torch.Tensor,  # [num_seqs] int32, tokens cached before this forward's new tokens
    cu_query_lens: torch.Tensor,  # [num_seqs + 1] int32, new tokens per request (CSR)
    tree_mask: torch.Tensor | None,  # [num_tokens, max_query_len] bool; None = causal
    scale: float,
    max_query_len: int | None = None,  # saves the kernel a host sync when tree_mask is None
    mask_starts: torch.Tensor | None = None,  # [num_seqs] int32: tree_mask's column 0 is this key position
    window: int = 0,  # sliding window in positions; 0: none. With a tree_mask, cut it by `window_mask` first
    positions: torch.Tensor | None = None,  # [num_tokens] query positions; None: context_len + index (causal)
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    args = (q, k_cache, v_cache, block_tables, context_lens, cu_query_lens, tree_mask, scale)
    window_args = dict(mask_starts=mask_starts, window=window, positions=positions)
    if use_triton(q, k_cache, v_cache):
        return tree_attention_triton(*args, max_query_len=max_query_len, **window_args)
    return tree_attention_reference(*args, **window_args)


def window_mask(mask: torch.Tensor, window: int) -> torch.Tensor:
    """[..., num_keys] bool -> each row keeps only its last `window` visible keys (the sliding window).

    Masks here are ancestors-only (causal, or a token tree): a query at position p sees one key per position, its
    prefix 0 .. start-1 and then one ancestor per depth up to itself, so the k-th visible key from the row's end
    sits k-1 positions behind it and "p - pos < window" is "fewer than `window` visible keys at or after it".
    Cutting a cut mask again changes nothing."""
    after = mask.flip(-1).cumsum(-1).flip(-1)  # visible keys at or after each column
    return mask & (after <= window)


def default_positions(context_lens: torch.Tensor, cu_query_lens: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """[num_tokens] int64: new token i of request s at context_lens[s] + i (prefill, decode)."""
    query_lens = (cu_query_lens[1:] - cu_query_lens[:-1]).long()
    seq = torch.repeat_interleave(torch.arange(len(query_lens), device=context_lens.device), query_lens,
                                  output_size=num_tokens)  # fmt: skip
    return context_lens.long()[seq] - cu_query_lens.long()[seq] + torch.arange(num_tokens, device=context_lens.device)


def tree_attention_reference(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int32
    context_lens: torch.Tensor,  # [num_seqs] int32
    cu_query_lens: torch.Tensor,  # [num_seqs + 1] int32
    tree_mask: torch.Tensor | None,  # [num_tokens, max_query_len] bool
    scale: float,
    mask_starts: torch.Tensor | None = None,  # [num_seqs] int32
    window: int = 0,  # with a tree_mask, already cut by window_mask
    positions: torch.Tensor | None = None,  # [num_tokens]
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """Plain torch, one request at a time, softmax in fp32. Queries that see no key at all get zeros."""
    num_tokens, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    k_slots = k_cache.reshape(-1, num_kv_heads, head_dim)  # [num_slots, num_kv_heads, head_dim]
    v_slots = v_cache.reshape(-1, num_kv_heads, head_dim)
    cu = cu_query_lens.tolist()
    assert cu[-1] == num_tokens, f"cu_query_lens ends at {cu[-1]}, q has {num_tokens} tokens"
    out = torch.zeros_like(q)
    starts = (mask_starts if mask_starts is not None else context_lens).tolist()
    if window:
        assert positions is not None or tree_mask is None, "a tree under a sliding window needs its query positions"
        positions = positions if positions is not None else default_positions(context_lens, cu_query_lens, num_tokens)
    for s, ctx in enumerate(context_lens.tolist()):
        q_begin, q_end = cu[s], cu[s + 1]
        query_len = q_end - q_begin
        if query_len == 0:
            continue
        pos = torch.arange(ctx + query_len, device=q.device)
        slots = block_tables[s, pos // block_size].long() * block_size + pos % block_size
        k = k_slots[slots].float().repeat_interleave(group, dim=1)  # [num_keys, num_heads, head_dim]
        v = v_slots[slots].float().repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[q_begin:q_end].float(), k) * scale
        visible = torch.ones(query_len, ctx + query_len, dtype=torch.bool, device=q.device)
        start = ctx if tree_mask is None else starts[s]
        if tree_mask is None:
            visible[:, ctx:] = torch.ones(query_len, query_len, dtype=torch.bool, device=q.device).tril()
        else:
            visible[:, start:] = tree_mask[q_begin:q_end, : ctx + query_len - start]
        if window:  # keys that sit at their own index: the whole row when causal, else the part before the mask
            by_index = pos if tree_mask is None else pos[:start]
            in_window = by_index[None, :] > positions[q_begin:q_end, None] - window
            visible[:, : by_index.numel()] &= in_window
        probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1).nan_to_num(0.0)
        out[q_begin:q_end] = torch.einsum("hqk,khd->qhd", probs, v).to(q.dtype)
    return out


def tree_attention_triton(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int32
    context_lens: torch.Tensor,  # [num_seqs] int32
    cu_query_lens: torch.Tensor,  # [num_seqs + 1] int32
    tree_mask: torch.Tensor | None,  # [num_tokens, max_query_len] bool
    scale: float,
    max_query_len: int | None = None,
    mask_starts: torch.Tensor | None = None,  # [num_seqs] int32; None: context_lens (the mask covers new tokens)
    window: int = 0,  # sliding window in positions; 0: none. A tree_mask must already be cut by window_mask
    positions: torch.Tensor | None = None,  # [num_tokens] int32/int64 query positions; None: context_len + index
    block_rows: int = 64,  # query rows (query tokens x heads of one group) per program
    block_keys: int = 64,
    num_splits: int | None = None,  # key-range splits per query block; None: enough to fill the GPU
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    num_tokens, num_heads, head_dim = q.shape
    num_blocks, block_size, num_kv_heads, kv_dim = k_cache.shape
    num_seqs = block_tables.shape[0]
    assert q.dtype in (torch.float32, torch.float16, torch.bfloat16), q.dtype
    assert k_cache.dtype == v_cache.dtype == q.dtype, (q.dtype, k_cache.dtype, v_cache.dtype)
    assert v_cache.shape == k_cache.shape and kv_dim == head_dim, (q.shape, k_cache.shape, v_cache.shape)
    assert num_heads % num_kv_heads == 0, f"{num_heads} heads do not split into {num_kv_heads} kv heads"
    assert q.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1, "head_dim must be contiguous"
    assert block_tables.dtype == context_lens.dtype == cu_query_lens.dtype == torch.int32
    assert block_tables.dim() == 2 and block_tables.stride(-1) == 1
    assert context_lens.shape == (num_seqs,) and cu_query_lens.shape == (num_seqs + 1,)
    if mask_starts is not None:
        assert tree_mask is not None, "mask_starts needs a tree_mask"
        assert mask_starts.dtype == torch.int32 and mask_starts.shape == (num_seqs,)
    if tree_mask is not None:
        assert tree_mask.dtype == torch.bool and tree_mask.dim() == 2 and tree_mask.shape[0] == num_tokens
        assert tree_mask.stride(-1) == 1, "tree_mask rows must be contiguous"
        if max_query_len is None and mask_starts is None:
            max_query_len = tree_mask.shape[1]
    if max_query_len is None:
        max_query_len = int((cu_query_lens[1:] - cu_query_lens[:-1]).max()) if num_seqs else 0
    assert window >= 0, f"window must be >= 0, got {window}"
    if window and positions is None:
        assert tree_mask is None, "a tree under a sliding window needs its query positions"
        positions = default_positions(context_lens, cu_query_lens, num_tokens)
    if positions is not None:
        assert positions.shape == (num_tokens,) and positions.dtype in (torch.int32, torch.int64), positions.shape
    out = torch.empty_like(q)
    if num_seqs == 0 or num_tokens == 0 or max_query_len == 0:
        return out

    group = num_heads // num_kv_heads
    block_rows = max(16, next_power_of_2(group), min(block_rows, next_power_of_2(max_query_len * group)))
    block_q = block_rows // group
    mask = tree_mask.view(torch.uint8) if tree_mask is not None else q  # q: a placeholder pointer, never read
    num_q_blocks = triton_cdiv(max_query_len, block_q)
    if num_splits is None:
        max_keys = block_tables.shape[1] * block_size
        if window:  # the key loop starts at the window
            max_keys = min(max_keys, window + max_query_len)
        num_splits = default_num_splits(q.device, num_seqs * num_q_blocks * num_kv_heads, max_keys, block_keys)
    # Split-KV (flash-decoding): with few requests, each query block's keys are cut into num_splits ranges run
    # by separate programs, which leave unnormalised partial results (acc, m, l) for a combine pass.
    partial_acc = partial_ml = out  # placeholders, never touched when num_splits == 1
    if num_splits > 1:
        partial_acc = torch.empty(num_splits, num_tokens, num_heads, head_dim, dtype=torch.float32, device=q.device)
        partial_ml = torch.empty(2, num_splits, num_tokens, num_heads, dtype=torch.float32, device=q.device)
    attention_kernel, combine_kernel = _build(interpret_enabled())
    attention_kernel[(num_seqs, num_q_blocks, num_kv_heads * num_splits)](
        q, k_cache, v_cache, out, block_tables, context_lens, cu_query_lens, mask,
        mask_starts if mask_starts is not None else context_lens, partial_acc, partial_ml,
        positions if positions is not None else context_lens,  # read only with a window
        scale * math.log2(math.e), window, num_tokens, num_heads, num_splits * num_tokens * num_heads,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), out.stride(0), out.stride(1),
        block_tables.stride(0), mask.stride(0) if tree_mask is not None else 0, block_size,
        GROUP=group, BLOCK_Q=block_q, BLOCK_R=block_rows, BLOCK_N=block_keys, HEAD_DIM=head_dim,
        BLOCK_D=max(16, next_power_of_2(head_dim)), HAS_MASK=tree_mask is not None,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        # triton 3.9's interpreter computes bf16 tl.dot wrongly; there the operands go up to fp32 first
        DOT_IN_FP32=interpret_enabled() and q.dtype == torch.bfloat16, NUM_SPLITS=num_splits,
    )  # fmt: skip
    if num_splits > 1:
        combine_kernel[(num_tokens, num_heads)](
            partial_acc, partial_ml, out, num_tokens, num_heads, num_splits * num_tokens * num_heads,
            out.stride(0), out.stride(1), NUM_SPLITS=num_splits, SPLITS_P2=next_power_of_2(num_splits),
            HEAD_DIM=head_dim, BLOCK_D=max(16, next_power_of_2(head_dim)),
        )  # fmt: skip
    return out


def default_num_splits(device: torch.device, num_programs: int, max_keys: int, block_keys: int) -> int:
    """Splits that bring the grid to ~2 programs per SM, each keeping at least 4 key blocks (no split off CUDA)."""
    if device.type != "cuda":
        return 1
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    if num_programs >= sms:
        return 1
    return max(1, min(triton_cdiv(2 * sms, num_programs), max_keys // (4 * block_keys), 32))


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.cache
def _build(interpret: bool):
    """Define the kernel under the current TRITON_INTERPRET (triton.jit reads it once, when decorating)."""
    global tl
    triton, tl = load_triton()

    @triton.jit
    def tree_attention_kernel(
        q_ptr, k_ptr, v_ptr, out_ptr, block_tables_ptr, context_lens_ptr, cu_query_lens_ptr, mask_ptr,
        mask_starts_ptr, partial_acc_ptr, partial_ml_ptr, positions_ptr,
        scale_log2, window, num_tokens, num_heads, ml_half,
        stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_ot, stride_oh,
        stride_bt, stride_mt, block_size,
        GROUP: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
        DOT_IN_FP32: tl.constexpr, NUM_SPLITS: tl.constexpr,
    ):  # fmt: skip
        seq = tl.program_id(0)
        q_start = tl.program_id(1) * BLOCK_Q
        kv_head = tl.program_id(2) // NUM_SPLITS
        split = tl.program_id(2) % NUM_SPLITS
        q_begin = tl.load(cu_query_lens_ptr + seq)
        query_len = tl.load(cu_query_lens_ptr + seq + 1) - q_begin
        if q_start >= query_len:
            return
        context_len = tl.load(context_lens_ptr + seq)
        mask_start = tl.load(mask_starts_ptr + seq)  # = context_len unless the mask also covers cached keys

        rows = tl.arange(0, BLOCK_R)
        q_idx = q_start + rows // GROUP  # request-local index of the new token on this row
        head = kv_head * GROUP + rows % GROUP
        row_ok = (rows < BLOCK_Q * GROUP) & (q_idx < query_len)
        token = (q_begin + q_idx).to(tl.int64)
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM
        q = tl.load(q_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # fmt: skip
        if DOT_IN_FP32:
            q = q.to(tl.float32)
        # Sliding window: a key sitting at its index (before mask_start) is visible iff index >= key_floor
        windowed = tl.full([BLOCK_R], window, tl.int32) > 0
        q_pos = tl.load(positions_ptr + token, mask=row_ok & windowed, other=0).to(tl.int32)
        key_floor = tl.where(windowed, q_pos - window + 1, 0)  # [BLOCK_R]

        m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_R], tl.float32)
        acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
        bt_row_ptr = block_tables_ptr + seq.to(tl.int64) * stride_bt
        k_head_ptr = k_ptr + kv_head * stride_kh
        v_head_ptr = v_ptr + kv_head * stride_vh
        keys = tl.arange(0, BLOCK_N)

        # One pass over every key: the cached prefix (visible to all new tokens, up to mask_start), then the keys
        # from mask_start on (visible through the tree mask; without one, the new tokens causally, where no key
        # past the block's last query can be visible).
        if HAS_MASK:
            num_keys = context_len + query_len
        else:
            num_keys = context_len + tl.minimum(query_len, q_start + BLOCK_Q)
        # Keys below every row's key_floor are skipped (with a mask, not those from mask_start: the mask decides).
        first_key = tl.maximum(tl.min(tl.where(row_ok, key_floor, num_keys), 0), 0)
        if HAS_MASK:
            first_key = tl.minimum(first_key, mask_start)
        keys_per_split = tl.cdiv(tl.cdiv(num_keys - first_key, NUM_SPLITS), BLOCK_N) * BLOCK_N
        lo = first_key + split * keys_per_split
        hi = tl.minimum(num_keys, lo + keys_per_split)
        for start in range(lo, hi, BLOCK_N):
            pos = start + keys
            pos_ok = pos < hi
            if HAS_MASK:
                j = pos - mask_start  # column of the tree mask; negative before it (always visible)
                is_new = (j >= 0)[None, :]
                bits = tl.load(mask_ptr + token[:, None] * stride_mt + j[None, :],
                               mask=row_ok[:, None] & is_new & pos_ok[None, :], other=0)  # fmt: skip
                new_visible = bits != 0
            else:
                j = pos - context_len  # index among the new tokens; negative in the cached prefix
                is_new = (j >= 0)[None, :]
                new_visible = j[None, :] <= q_idx[:, None]
            in_window = pos[None, :] >= key_floor[:, None]
            if HAS_MASK:
                visible = row_ok[:, None] & pos_ok[None, :] & ((~is_new & in_window) | new_visible)
            else:
                visible = row_ok[:, None] & pos_ok[None, :] & (~is_new | new_visible) & in_window

            # Key at logical position p lives in block block_tables[seq, p // block_size] at offset p % block_size.
            block = tl.load(bt_row_ptr + pos // block_size, mask=pos_ok, other=0)
            k_row = block.to(tl.int64) * stride_kb + pos % block_size * stride_ks
            kv_ok = pos_ok[:, None] & d_ok[None, :]
            k = tl.load(k_head_ptr + (k_row[:, None] + d[None, :]), mask=kv_ok, other=0.0)
            if DOT_IN_FP32:
                k = k.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2  # [BLOCK_R, BLOCK_N]
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # A row that has seen nothing yet keeps m = -inf; shift by 0 instead so exp2 gives 0, not NaN.
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(s - m_safe[:, None])
            alpha = tl.exp2(m_i - m_safe)
            v_row = block.to(tl.int64) * stride_vb + pos % block_size * stride_vs
            v = tl.load(v_head_ptr + (v_row[:, None] + d[None, :]), mask=kv_ok, other=0.0)
            if DOT_IN_FP32:
                v = v.to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            l_i = l_i * alpha + tl.sum(p, 1)
            m_i = m_new

        if NUM_SPLITS == 1:
            out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
            tl.store(out_ptr + token[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
                     out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])  # fmt: skip
        else:
            # partials [num_splits, num_tokens, num_heads, (head_dim)]; m and l are the two halves of partial_ml
            row = (split.to(tl.int64) * num_tokens + token) * num_heads + head
            tl.store(partial_acc_ptr + row[:, None] * HEAD_DIM + d[None, :], acc,
                     mask=row_ok[:, None] & d_ok[None, :])  # fmt: skip
            tl.store(partial_ml_ptr + row, m_i, mask=row_ok)
            tl.store(partial_ml_ptr + ml_half + row, l_i, mask=row_ok)

    @triton.jit
    def combine_splits_kernel(
        partial_acc_ptr, partial_ml_ptr, out_ptr, num_tokens, num_heads, ml_half, stride_ot, stride_oh,
        NUM_SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        # One softmax over all splits: m = max m_s, l = Σ l_s·2^(m_s − m), out = Σ acc_s·2^(m_s − m) / l.
        token = tl.program_id(0).to(tl.int64)
        head = tl.program_id(1)
        parts = tl.arange(0, SPLITS_P2)
        parts_ok = parts < NUM_SPLITS
        row = (parts.to(tl.int64) * num_tokens + token) * num_heads + head
        m = tl.load(partial_ml_ptr + row, mask=parts_ok, other=float("-inf"))
        l = tl.load(partial_ml_ptr + ml_half + row, mask=parts_ok, other=0.0)
        m_max = tl.max(m, 0)
        weight = tl.exp2(m - tl.where(m_max == float("-inf"), 0.0, m_max))  # a split that saw nothing weighs 0
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM
        acc = tl.load(partial_acc_ptr + row[:, None] * HEAD_DIM + d[None, :], mask=parts_ok[:, None] & d_ok[None, :],
                      other=0.0)  # fmt: skip
        total = tl.sum(l * weight, 0)
        out = tl.sum(acc * weight[:, None], 0) / tl.where(total == 0.0, 1.0, total)
        tl.store(out_ptr + token * stride_ot + head * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d_ok)

    return tree_attention_kernel, combine_splits_kernel
