"""Tree attention: the Triton kernel (interpreted) against the torch reference, and the reference against dense
SDPA on the same keys, over ragged batches with the edge cases a verifier meets."""

from __future__ import annotations

import math

import pytest
import torch

from specrelay.kernels.tree_attention import tree_attention, tree_attention_reference, tree_attention_triton

from .conftest import ancestor_mask, random_parents


def make_batch(context_lens, query_lens, *, num_heads, num_kv_heads, head_dim=16, block_size=4, dtype=torch.float32,
               tree=True, seed=0):  # fmt: skip
    """Random paged cache; each request's blocks are scattered (shuffled) through the pool."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [math.ceil((c + q) / block_size) for c, q in zip(context_lens, query_lens)]
    max_blocks = max(max(blocks_per_seq), 1)
    num_blocks = sum(blocks_per_seq) + 3
    perm = torch.randperm(num_blocks, generator=gen)
    block_tables = torch.zeros(len(context_lens), max_blocks, dtype=torch.int32)
    used = 0
    for s, nb in enumerate(blocks_per_seq):
        block_tables[s, :nb] = perm[used : used + nb]
        used += nb
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    num_tokens = sum(query_lens)
    q = torch.randn(num_tokens, num_heads, head_dim, generator=gen).to(dtype)
    cu = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32)
    tree_mask = None
    if tree:
        tree_mask = torch.zeros(num_tokens, max(max(query_lens), 1), dtype=torch.bool)
        for s, n in enumerate(query_lens):
            if n:
                tree_mask[cu[s] : cu[s + 1], :n] = ancestor_mask(random_parents(n, gen))
    return dict(q=q, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables,
                context_lens=torch.tensor(context_lens, dtype=torch.int32), cu_query_lens=cu, tree_mask=tree_mask,
                scale=head_dim**-0.5)  # fmt: skip


CASES = {
    "one_request": ([9], [6]),
    "many_ragged_with_empty": ([0, 3, 4, 13, 7], [5, 0, 1, 8, 3]),
    "block_boundaries": ([4, 8, 3], [4, 1, 5]),
    "depth1_trees": ([5, 2], [4, 6]),  # masks built below: root + children only
    "no_context": ([0, 0], [7, 2]),
}


@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("case", sorted(CASES))
def test_kernel_matches_reference_on_trees(case, group):
    context_lens, query_lens = CASES[case]
    batch = make_batch(context_lens, query_lens, num_heads=2 * group, num_kv_heads=2, seed=group)
    if case == "depth1_trees":
        mask = batch["tree_mask"]
        for s, n in enumerate(query_lens):
            start = int(batch["cu_query_lens"][s])
            mask[start : start + n, :n] = ancestor_mask([-1] + [0] * (n - 1))
    want = tree_attention_reference(**batch)
    got = tree_attention_triton(**batch)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("group", [1, 4])
def test_causal_prefill_and_decode(group):
    # request 0 prefills 9 tokens, request 1 decodes one token after 6 cached, request 2 is idle
    batch = make_batch([0, 6, 5], [9, 1, 0], num_heads=2 * group, num_kv_heads=2, tree=False)
    want = tree_attention_reference(**batch)
    torch.testing.assert_close(tree_attention_triton(**batch), want, atol=2e-5, rtol=1e-4)
    # a causal mask spelled out must give the same output as tree_mask=None
    spelled = dict(batch, tree_mask=torch.zeros(10, 9, dtype=torch.bool))
    spelled["tree_mask"][:9, :9] = torch.ones(9, 9, dtype=torch.bool).tril()
    spelled["tree_mask"][9, 0] = True
    torch.testing.assert_close(tree_attention_triton(**spelled), want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(dtype):
    batch = make_batch([5, 11], [6, 3], num_heads=8, num_kv_heads=2, dtype=dtype, head_dim=32, seed=3)
    want = tree_attention_reference(**batch).float()
    got = tree_attention_triton(**batch)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)


def test_reference_matches_dense_sdpa():
    """The reference's meaning, checked independently: gather each request's keys by position, then SDPA."""
    batch = make_batch([6, 3], [5, 4], num_heads=4, num_kv_heads=2, seed=7)
    out = tree_attention_reference(**batch)
    block_size = batch["k_cache"].shape[1]
    for s, (ctx, q0, q1) in enumerate(zip([6, 3], [0, 5], [5, 9])):
        pos = torch.arange(ctx + q1 - q0)
        slots = batch["block_tables"][s, pos // block_size].long() * block_size + pos % block_size
        k = batch["k_cache"].flatten(0, 1)[slots].repeat_interleave(2, dim=1).transpose(0, 1)  # [H, keys, D]
        v = batch["v_cache"].flatten(0, 1)[slots].repeat_interleave(2, dim=1).transpose(0, 1)
        visible = torch.cat([torch.ones(q1 - q0, ctx, dtype=torch.bool), batch["tree_mask"][q0:q1, : q1 - q0]], 1)
        want = torch.nn.functional.scaled_dot_product_attention(
            batch["q"][q0:q1].transpose(0, 1), k, v, attn_mask=visible, scale=batch["scale"]
        ).transpose(0, 1)
        torch.testing.assert_close(out[q0:q1], want, atol=1e-5, rtol=1e-5)


def test_dispatch_runs_kernel_under_interpreter(monkeypatch):
    batch = make_batch([3], [4], num_heads=4, num_kv_heads=4)
    calls = []
    import specrelay.kernels.tree_attention as module

    real = module.tree_attention_triton
    monkeypatch.setattr(module, "tree_attention_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.testing.assert_close(tree_attention(**batch), tree_attention_reference(**batch), atol=2e-5, rtol=1e-4)
    assert calls == [1]
    monkeypatch.setenv("SPECRELAY_KERNELS", "torch")
    tree_attention(**batch)
    assert calls == [1]


def test_empty_batch_and_shape_checks():
    batch = make_batch([3, 2], [0, 0], num_heads=4, num_kv_heads=2, tree=False)
    assert tree_attention_triton(**batch).shape == (0, 4, 16)
    bad = make_batch([3], [2], num_heads=6, num_kv_heads=4, tree=False)
    with pytest.raises(AssertionError, match="do not split"):
        tree_attention_triton(**bad)


@pytest.mark.parametrize("seed", range(4))
def test_random_ragged_batches(seed):
    gen = torch.Generator().manual_seed(100 + seed)
    num_seqs = int(torch.randint(1, 7, (1,), generator=gen))
    context_lens = torch.randint(0, 14, (num_seqs,), generator=gen).tolist()
    query_lens = torch.randint(0, 10, (num_seqs,), generator=gen).tolist()
    query_lens[0] = max(query_lens[0], 1)
    group = [1, 4, 8][seed % 3]
    batch = make_batch(context_lens, query_lens, num_heads=group * 2, num_kv_heads=2, block_size=[1, 4, 16][seed % 3],
                       tree=seed % 2 == 0, seed=seed)  # fmt: skip
    torch.testing.assert_close(tree_attention_triton(**batch), tree_attention_reference(**batch), atol=2e-5, rtol=1e-4)


def test_query_split_from_fused_qkv():
    """q as the model produces it: a strided view into the fused qkv projection."""
    batch = make_batch([5, 2], [3, 4], num_heads=8, num_kv_heads=2, seed=9)
    qkv = torch.randn(7, 8 + 2 * 2, 16)
    qkv[:, :8] = batch["q"]
    batch["q"] = qkv[:, :8]
    assert not batch["q"].is_contiguous()
    torch.testing.assert_close(tree_attention_triton(**batch), tree_attention_reference(**batch), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("num_splits", [2, 3, 5])
@pytest.mark.parametrize("tree", [True, False], ids=["tree", "causal"])
def test_split_kv_equals_one_pass(num_splits, tree):
    """Flash-decoding splits (with splits that get no keys at all) combine into the same softmax."""
    batch = make_batch([0, 3, 21, 9, 6], [3, 0, 5, 1, 4], num_heads=8, num_kv_heads=2, tree=tree, seed=num_splits)
    want = tree_attention_reference(**batch)
    got = tree_attention_triton(**batch, num_splits=num_splits, block_keys=16)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_default_splits_fill_the_gpu(monkeypatch):
    import specrelay.kernels.tree_attention as module

    monkeypatch.setattr(module, "_sm_count", lambda index: 132)
    cuda = torch.device("cuda", 0)
    assert module.default_num_splits(cuda, 8, 1088, 64) == 4  # one decode request: capped by 4 key blocks a split
    assert module.default_num_splits(cuda, 8, 65536, 64) == 32  # long context: capped at 32 splits
    assert module.default_num_splits(cuda, 256, 65536, 64) == 1  # the grid already covers every SM
    assert module.default_num_splits(torch.device("cpu"), 8, 65536, 64) == 1


@pytest.mark.parametrize("group", [1, 4])
def test_mask_over_cached_keys_matches_sdpa(group):
    """The drafter's case: a tree grown over several forwards has its earlier levels cached, so the mask starts
    before the new tokens (`mask_starts`). Kernel and reference against the runtime's SDPA path, built by
    ForwardBatch from the same per-request masks."""
    from specrelay.shared.modeling.batch import ForwardBatch
    from specrelay.shared.modeling.llama import paged_attention

    gen = torch.Generator().manual_seed(group)
    block_size, num_kv_heads, head_dim = 4, 2, 16
    # (context, new, mask start): a tree whose first 3 levels are cached; a plain tree; one crossing blocks
    seqs = [(10, 3, 6), (5, 4, None), (7, 6, 2)]
    tables, masks, slots, next_block = [], [], [], 0
    for c, n, start in seqs:
        nb = math.ceil((c + n) / block_size)
        tables.append(list(range(next_block, next_block + nb)))
        next_block += nb
        slots.append([tables[-1][p // block_size] * block_size + p % block_size for p in range(c, c + n)])
        width = c + n - (c if start is None else start)
        mask = torch.rand(n, width, generator=gen) < 0.5
        mask[torch.arange(n), width - n + torch.arange(n)] = True  # each token sees itself
        masks.append(mask)
    batch = ForwardBatch.build([[1] * n for _, n, _ in seqs], [c for c, _, _ in seqs], slots, tables,
                               tree_masks=masks, mask_starts=[s for _, _, s in seqs])
    assert batch.masks_context and batch.mask_starts is not None
    k_cache = torch.randn(next_block, block_size, num_kv_heads, head_dim, generator=gen)
    v_cache = torch.randn(next_block, block_size, num_kv_heads, head_dim, generator=gen)
    q = torch.randn(sum(n for _, n, _ in seqs), num_kv_heads * group, head_dim, generator=gen)
    args = dict(q=q, k_cache=k_cache, v_cache=v_cache, block_tables=batch.block_tables,
                context_lens=batch.context_lens, cu_query_lens=batch.cu_query_lens, tree_mask=batch.tree_mask,
                scale=head_dim**-0.5, mask_starts=batch.mask_starts)  # fmt: skip
    want = paged_attention(q, k_cache, v_cache, batch, head_dim**-0.5)
    torch.testing.assert_close(tree_attention_reference(**args), want, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(tree_attention_triton(**args, max_query_len=6), want, atol=2e-5, rtol=1e-4)
