"""Speculative acceptance: the kernel (interpreted) equals the reference on the same uniforms; the reference
accepts what the rules say on hand-built trees, and its sampling is lossless (the first emitted token follows p)."""

from __future__ import annotations

import pytest
import torch

from specrelay.kernels.spec_accept import spec_accept, spec_accept_reference, spec_accept_triton, tree_depths

from .conftest import random_parents


def make_trees(sizes, vocab, *, seed, greedy, max_depth=None):
    """Random trees whose children are drawn from q without replacement; p leans on q so paths get accepted.
    For greedy, the first child of every node carries argmax p (so deep paths exist), the rest are random."""
    gen = torch.Generator().manual_seed(seed)
    tokens, parents, p_rows, q_rows = [], [], [], []
    for n in sizes:
        q = torch.softmax(torch.randn(n, vocab, generator=gen) * 2, -1)
        p = 0.4 * torch.softmax(torch.randn(n, vocab, generator=gen) * 2, -1) + 0.6 * q
        par = random_parents(n, gen, max_depth)
        tok = [int(torch.randint(vocab, (1,), generator=gen))]
        seen: dict[int, set[int]] = {}
        for i in range(1, n):
            used = seen.setdefault(par[i], set())
            if greedy and not used and bool(torch.rand(1, generator=gen) < 0.8):
                t = int(p[par[i]].argmax())
            else:
                weights = q[par[i]].clone()
                weights[list(used)] = 0
                t = int(torch.multinomial(weights, 1, generator=gen))
            used.add(t)
            tok.append(t)
        tokens += tok
        parents += par
        p_rows.append(p)
        q_rows.append(q)
    cu = torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()])
    return dict(tokens=torch.tensor(tokens), parents=torch.tensor(parents), cu_nodes=cu,
                target_probs=torch.cat(p_rows), draft_probs=None if greedy else torch.cat(q_rows),
                uniforms=torch.rand(len(tokens), generator=gen), final_uniforms=torch.rand(len(sizes), generator=gen),
                greedy=greedy)  # fmt: skip


def assert_same(got, want):
    assert got.num_accepted.tolist() == want.num_accepted.tolist()
    assert got.accepted_nodes.tolist() == want.accepted_nodes.tolist()
    assert got.next_token.tolist() == want.next_token.tolist()


BATCHES = {
    "one_request": [9],
    "root_only": [1, 1],
    "depth1": [6, 3],
    "many_ragged": [1, 12, 5, 20, 2, 7],
}


@pytest.mark.parametrize("greedy", [True, False], ids=["greedy", "sampling"])
@pytest.mark.parametrize("batch", sorted(BATCHES))
def test_kernel_matches_reference(batch, greedy):
    for seed in range(3):
        trees = make_trees(BATCHES[batch], vocab=300, seed=seed, greedy=greedy,
                           max_depth=1 if batch == "depth1" else None)  # fmt: skip
        want = spec_accept_reference(**trees)
        assert_same(spec_accept_triton(**trees, block_vocab=128), want)


def test_kernel_walks_deep_paths_and_vocab_tail():
    # vocab not a multiple of the kernel's chunk, trees with long accepted paths
    trees = make_trees([30, 25], vocab=1000, seed=11, greedy=True)
    want = spec_accept_reference(**trees)
    assert int(want.num_accepted.max()) >= 3
    assert_same(spec_accept_triton(**trees, block_vocab=256), want)


def test_greedy_hand_built_chain():
    # request 0: root -> 1 (token 3) -> 2 (token 1); root -> 3 (token 4). argmax: root 3, node1 1, node2 0.
    # request 1: root only, argmax 2.
    vocab = 5
    p = torch.full((5, vocab), 0.1)
    for row, best in [(0, 3), (1, 1), (2, 0), (3, 4), (4, 2)]:
        p[row, best] = 0.6
    trees = dict(tokens=torch.tensor([7, 3, 1, 4, 9]), parents=torch.tensor([-1, 0, 1, 0, -1]),
                 cu_nodes=torch.tensor([0, 4, 5]), target_probs=p, draft_probs=None,
                 uniforms=torch.zeros(5), final_uniforms=torch.zeros(2), greedy=True)  # fmt: skip
    for impl in (spec_accept_reference, spec_accept_triton):
        result = impl(**trees)
        assert result.num_accepted.tolist() == [2, 0]
        assert result.accepted_nodes.tolist() == [[1, 2], [-1, -1]]
        assert result.next_token.tolist() == [0, 2]


def test_sampling_hand_built_reject_then_recover():
    # Root with children tokens 0 then 1. p = [0, .5, .5], q = [.5, .5, 0].
    # Child 0: R[0] = 0 -> rejected; R <- norm(max(p - q, 0)) = [0, 0, 1]; D <- norm([0, .5, 0]) = [0, 1, 0].
    # Child 1: u·D[1] = u > R[1] = 0 -> rejected; R stays [0, 0, 1] (max(R - D, 0) = [0, 0, 1]); D is all zero.
    # Recovered token: 2 whatever the final uniform.
    p = torch.tensor([[0.0, 0.5, 0.5]] * 3)
    q = torch.tensor([[0.5, 0.5, 0.0]] * 3)
    trees = dict(tokens=torch.tensor([2, 0, 1]), parents=torch.tensor([-1, 0, 0]), cu_nodes=torch.tensor([0, 3]),
                 target_probs=p, draft_probs=q, uniforms=torch.tensor([0.0, 0.1, 0.9]),
                 final_uniforms=torch.tensor([0.3]), greedy=False)  # fmt: skip
    for impl in (spec_accept_reference, spec_accept_triton):
        result = impl(**trees)
        assert result.num_accepted.tolist() == [0] and result.next_token.tolist() == [2]
    # With p = q the first child is always accepted, and its leaf's bonus comes from p[leaf].
    trees.update(target_probs=q, uniforms=torch.tensor([0.0, 0.999, 0.5]), final_uniforms=torch.tensor([0.75]))
    for impl in (spec_accept_reference, spec_accept_triton):
        result = impl(**trees)
        assert result.num_accepted.tolist() == [1] and result.accepted_nodes.tolist() == [[1]]
        assert result.next_token.tolist() == [1]  # inverse CDF of [.5, .5, 0] at 0.75


def test_sampling_is_lossless():
    """Three children drawn from q without replacement, then accept/reject: the first emitted token follows p."""
    gen = torch.Generator().manual_seed(5)
    vocab, num_seqs = 6, 4000
    p = torch.tensor([0.30, 0.05, 0.25, 0.10, 0.20, 0.10])
    q = torch.tensor([0.05, 0.50, 0.05, 0.30, 0.05, 0.05])  # q far from p: most children get rejected
    children = torch.stack([torch.multinomial(q, 3, replacement=False, generator=gen) for _ in range(num_seqs)])
    tokens = torch.cat([torch.zeros(num_seqs, 1, dtype=torch.long), children], 1).flatten()
    result = spec_accept_reference(
        tokens=tokens, parents=torch.tensor([-1, 0, 0, 0]).repeat(num_seqs),
        cu_nodes=torch.arange(0, 4 * num_seqs + 1, 4), target_probs=p.repeat(4 * num_seqs, 1),
        draft_probs=q.repeat(4 * num_seqs, 1), uniforms=torch.rand(4 * num_seqs, generator=gen),
        final_uniforms=torch.rand(num_seqs, generator=gen), greedy=False,
    )  # fmt: skip
    first_node = result.accepted_nodes[:, 0]
    first_token = tokens.view(num_seqs, 4).gather(1, first_node.clamp_min(0)[:, None])[:, 0]
    first = torch.where(result.num_accepted > 0, first_token, result.next_token)
    freq = torch.bincount(first, minlength=vocab).float() / num_seqs
    # total variation: ~0.015 from sampling noise; keeping D[y] (not sampling without replacement) gives ~0.11
    assert (freq - p).abs().sum() / 2 < 0.04, freq


def test_tree_depths_and_dispatch():
    parents = torch.tensor([-1, 0, 1, 0, 3, 4, -1, 0])
    assert tree_depths(parents, torch.tensor([0, 6, 8])).tolist() == [0, 1, 2, 1, 2, 3, 0, 1]
    trees = make_trees([4, 3], vocab=50, seed=1, greedy=False)
    assert spec_accept(**trees).accepted_nodes.shape[0] == 2
    assert_same(spec_accept(**trees), spec_accept_reference(**trees))


@pytest.mark.parametrize("greedy", [True, False], ids=["greedy", "sampling"])
def test_bf16_probabilities(greedy):
    trees = make_trees([7, 4, 11], vocab=200, seed=21, greedy=greedy)
    trees["target_probs"] = trees["target_probs"].bfloat16()
    if not greedy:
        trees["draft_probs"] = trees["draft_probs"].bfloat16()
    assert_same(spec_accept_triton(**trees, block_vocab=64), spec_accept_reference(**trees))


def test_sampling_residual_without_mass_keeps_r():
    # p = q/2 (not normalised): the one child (token 3, u·D = .36 > R = .2) is rejected and max(R - D, 0) = 0,
    # so R stays p and the recovered token comes from p itself: the CDF [.05, .15, .3, .5] first passes
    # u_final·Σp = .25 at token 2. Siblings instead: D[3] <- 0 would leave residual mass on token 3.
    q = torch.tensor([[0.1, 0.2, 0.3, 0.4]] * 2)
    trees = dict(tokens=torch.tensor([0, 3]), parents=torch.tensor([-1, 0]), cu_nodes=torch.tensor([0, 2]),
                 target_probs=q / 2, draft_probs=q, uniforms=torch.tensor([0.0, 0.9]),
                 final_uniforms=torch.tensor([0.5]), greedy=False)  # fmt: skip
    for impl in (spec_accept_reference, spec_accept_triton):
        result = impl(**trees)
        assert result.num_accepted.tolist() == [0] and result.next_token.tolist() == [2]
    trees.update(tokens=torch.tensor([0, 3, 1]), parents=torch.tensor([-1, 0, 0]), cu_nodes=torch.tensor([0, 3]),
                 target_probs=torch.cat([q, q[:1]]) / 2, draft_probs=torch.cat([q, q[:1]]),
                 uniforms=torch.tensor([0.0, 0.9, 0.9]))  # fmt: skip
    for impl in (spec_accept_reference, spec_accept_triton):
        result = impl(**trees)
        assert result.num_accepted.tolist() == [0] and result.next_token.tolist() == [3]
