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


def dense_attention(q, keys, values, visible, scale):  # [n, H, D], [k, H_kv, D] x2, [n, k] -> [n, H, D]
    group = q.shape[1] // keys.shape[1]
    k, v = (t.repeat_interleave(group, dim=1).transpose(0, 1) for t in (keys, values))  # [H, k, D]
    return torch.nn.functional.scaled_dot_product_attention(q.transpose(0, 1), k, v, attn_mask=visible,
                                                            scale=scale).transpose(0, 1)  # fmt: skip


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("window", [1, 4, 5, 16])
def test_sliding_window_prefill_and_decode(window, num_splits):
    """A causal window against its definition (key j visible to query i iff i - window < j <= i), with contexts
    and windows that start and end on block boundaries (block_size 4, 16 keys a kernel block) and off them."""
    context_lens, query_lens = [0, 16, 13, 3, 40], [21, 1, 8, 4, 7]
    batch = make_batch(context_lens, query_lens, num_heads=8, num_kv_heads=2, tree=False, seed=window)
    block_size = batch["k_cache"].shape[1]
    got = tree_attention_triton(**batch, window=window, num_splits=num_splits, block_keys=16)
    want = tree_attention_reference(**batch, window=window)
    unwindowed = tree_attention_reference(**batch)
    for s, (ctx, n) in enumerate(zip(context_lens, query_lens)):
        q0 = sum(query_lens[:s])
        pos = torch.arange(ctx + n)
        slots = batch["block_tables"][s, pos // block_size].long() * block_size + pos % block_size
        query_pos = ctx + torch.arange(n)
        visible = (pos[None, :] <= query_pos[:, None]) & (pos[None, :] > query_pos[:, None] - window)
        truth = dense_attention(batch["q"][q0 : q0 + n], batch["k_cache"].flatten(0, 1)[slots],
                                batch["v_cache"].flatten(0, 1)[slots], visible, batch["scale"])  # fmt: skip
        torch.testing.assert_close(want[q0 : q0 + n], truth, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    assert (unwindowed - want).abs().max() > 0.1  # the window really hides keys here


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("window", [2, 3, 6])
def test_sliding_window_over_trees(window, num_splits):
    """Token trees deeper than the window, as the verifier (mask over the new tokens) and the drafter (earlier
    levels cached: mask_starts) run them: kernel, reference and the runtime's SDPA path, each with ForwardBatch's
    window masks, against attention by position (node at prefix + depth; ancestors only; within the window)."""
    from specrelay.shared.modeling.batch import ForwardBatch
    from specrelay.shared.modeling.llama import paged_attention

    gen = torch.Generator().manual_seed(window)
    block_size, num_kv_heads, head_dim, group = 4, 2, 16, 4
    # (committed prefix, tree nodes, of which already cached): a verifier tree, drafter trees with cached levels
    seqs = [(9, 14, 0), (16, 16, 5), (3, 10, 4)]
    tables, masks, slots, positions, parents_of, next_block = [], [], [], [], [], 0
    for prefix, nodes, cached in seqs:
        # each node hangs under one of the two before it: a bushy tree about nodes/2 deep
        parents = [-1] + [max(0, i - 1 - int(torch.randint(2, (1,), generator=gen))) for i in range(1, nodes)]
        depth = [0] * nodes
        for i in range(1, nodes):
            depth[i] = depth[parents[i]] + 1
        assert max(depth) >= window  # some tree ancestors fall out of the window too, not only the prefix
        nb = math.ceil((prefix + nodes) / block_size)
        tables.append(list(range(next_block, next_block + nb)))
        next_block += nb
        slots.append([tables[-1][p // block_size] * block_size + p % block_size
                      for p in range(prefix + cached, prefix + nodes)])  # fmt: skip
        masks.append(ancestor_mask(parents)[cached:])  # [new nodes, all nodes]: columns from the mask start
        positions.append([prefix + depth[i] for i in range(cached, nodes)])
        parents_of.append((parents, depth))
    batch = ForwardBatch.build([[1] * (n - c) for _, n, c in seqs], [p + c for p, _, c in seqs], slots, tables,
                               positions=positions, tree_masks=masks, mask_starts=[p for p, _, _ in seqs],
                               window=window)  # fmt: skip
    k_cache = torch.randn(next_block, block_size, num_kv_heads, head_dim, generator=gen)
    v_cache = torch.randn(next_block, block_size, num_kv_heads, head_dim, generator=gen)
    q = torch.randn(sum(n - c for _, n, c in seqs), num_kv_heads * group, head_dim, generator=gen)
    args = dict(q=q, k_cache=k_cache, v_cache=v_cache, block_tables=batch.block_tables,
                context_lens=batch.context_lens, cu_query_lens=batch.cu_query_lens,
                tree_mask=batch.window_tree_mask, scale=head_dim**-0.5, mask_starts=batch.mask_starts,
                window=window, positions=batch.positions)  # fmt: skip

    truth, unwindowed, row = [], [], 0
    for s, (prefix, nodes, cached) in enumerate(seqs):
        parents, depth = parents_of[s]
        idx = torch.arange(prefix + nodes)
        key_pos = torch.tensor(list(range(prefix)) + [prefix + d for d in depth])
        slots_all = torch.tensor(tables[s])[idx // block_size] * block_size + idx % block_size
        keys, values = k_cache.flatten(0, 1)[slots_all], v_cache.flatten(0, 1)[slots_all]
        tree = ancestor_mask(parents)
        for i in range(cached, nodes):
            sees = torch.cat([torch.ones(prefix, dtype=torch.bool), tree[i]])
            near = key_pos > prefix + depth[i] - window
            truth.append(dense_attention(q[row : row + 1], keys, values, (sees & near)[None], head_dim**-0.5))
            unwindowed.append(dense_attention(q[row : row + 1], keys, values, sees[None], head_dim**-0.5))
            row += 1
    truth, unwindowed = torch.cat(truth), torch.cat(unwindowed)
    assert (truth - unwindowed).abs().max() > 0.1  # the window really hides keys here
    torch.testing.assert_close(tree_attention_reference(**args), truth, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(paged_attention(q, k_cache, v_cache, batch, head_dim**-0.5, windowed=True), truth,
                               atol=2e-5, rtol=1e-4)  # fmt: skip
    got = tree_attention_triton(**args, num_splits=num_splits, block_keys=16)
    torch.testing.assert_close(got, truth, atol=2e-5, rtol=1e-4)


def test_windowed_model_kernel_path_equals_torch_path(tmp_path):
    """A tiny Mistral with a 4-token window under speculative decoding (drafts grown over cached levels, verified
    6 deep, so the tree's own root falls out of the window): with SPECRELAY_KERNELS=triton its attention runs the
    kernel with the window, and greedy output equals the torch (SDPA) path token for token."""
    from unittest import mock

    from transformers import AutoModelForCausalLM, MistralConfig

    import specrelay.kernels.tree_attention as module
    from specrelay.kernels.dispatch import set_kernel_mode
    from specrelay.services.drafter.draft_model import DraftModelProposer
    from specrelay.services.verifier.engine import SpecEngine
    from specrelay.shared.modeling.loader import load_model
    from specrelay.shared.modeling.runner import ModelRunner
    from specrelay.shared.sampling import SamplingParams

    torch.manual_seed(8)
    config = MistralConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                           initializer_range=0.2, sliding_window=4)  # fmt: skip
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    target, draft = load_model(tmp_path), load_model(tmp_path)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(0.003 * torch.randn(p.shape, generator=gen))
    prompts = [torch.randint(0, 101, (n,), generator=gen).tolist() for n in (5, 21)]

    def generate():
        engine = SpecEngine(ModelRunner(target, num_blocks=64, prefill_chunk=8),
                            DraftModelProposer.chain(ModelRunner(draft, num_blocks=64, prefill_chunk=8), length=6),
                            max_nodes=8)  # fmt: skip
        return [r.output for r in engine.generate(prompts, SamplingParams(max_tokens=12))]

    set_kernel_mode("torch")
    expected = generate()
    set_kernel_mode("triton")
    with mock.patch.object(module, "tree_attention_triton", wraps=module.tree_attention_triton) as calls:
        assert generate() == expected
    assert calls.call_count > 0 and all(c.kwargs["window"] == 4 for c in calls.call_args_list)
