"""Speculative acceptance for a batch of token trees: which draft nodes the target model accepts, and the token
that follows them (bonus or recovered).

Greedy: from the root, move to the child whose token is argmax p[current]; stop when there is none. The next token
is argmax p[last accepted] (the bonus token).

Sampling, multi-draft speculative sampling (SpecInfer, arXiv 2305.09781; Sequoia, arXiv 2402.12374): at node c
with children y1..yk (drawn from q[c] without replacement, in node index order), R = p[c], D = q[c]; for each
child y in order: accept iff u_y·D[y] ≤ R[y] (u ≤ R/D) and R[y] > 0; on reject R ← norm(max(R − D, 0)), D[y] ← 0,
D ← norm(D), and stop trying once D is all zero. An accepted child becomes the current node. When no child is
accepted the recovered token is drawn from R; when the walk reaches a leaf the bonus token is drawn from p[leaf]
(R untouched). Draws are by inverse CDF: the first token whose cumulative mass exceeds u_final·ΣR. The output then
follows p exactly (lossless): each reject leaves the residual that the next sibling's test needs, and zeroing D[y]
is what drawing siblings without replacement requires. Requiring R[y] > 0 never accepts a token the target rules
out, even where a degenerate D[y] = 0 would pass u·D ≤ R.

Inputs are CSR over requests: node i of request s is row cu_nodes[s] + i; parents are request-local, -1 for the
root (node 0, the last committed token), parents[i] < i.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from specrelay.kernels.dispatch import interpret_enabled, load_triton, use_triton

tl = None  # triton.language, bound by _build() on first use


@dataclass
class SpecAcceptResult:
    num_accepted: torch.Tensor  # [num_seqs] int64: accepted non-root nodes
    accepted_nodes: torch.Tensor  # [num_seqs, max_depth] int64: request-local node ids root-down, -1 padded
    next_token: torch.Tensor  # [num_seqs] int64: the bonus token (walk reached a leaf) or the recovered token


def spec_accept(
    tokens: torch.Tensor,  # [num_nodes] int64
    parents: torch.Tensor,  # [num_nodes] int64, request-local, -1 for each root
    cu_nodes: torch.Tensor,  # [num_seqs + 1] int64 (or int32)
    target_probs: torch.Tensor,  # [num_nodes, vocab] p of the token after each node
    draft_probs: torch.Tensor | None,  # [num_nodes, vocab] q at each node; None when greedy
    uniforms: torch.Tensor,  # [num_nodes] float32, u of each node's accept test
    final_uniforms: torch.Tensor,  # [num_seqs] float32, u of the bonus/recovered draw
    greedy: bool,
) -> SpecAcceptResult:
    args = (tokens, parents, cu_nodes, target_probs, draft_probs, uniforms, final_uniforms, greedy)
    if use_triton(target_probs):
        return spec_accept_triton(*args)
    return spec_accept_reference(*args)


def tree_depths(parents: torch.Tensor, cu_nodes: torch.Tensor) -> torch.Tensor:  # [num_nodes] int64
    """Depth of every node (root 0) by pointer jumping: log2(num_nodes) vectorised rounds, no per-node loop."""
    num_nodes = parents.numel()
    cu = cu_nodes.long()
    seq_of_node = torch.searchsorted(cu[1:], torch.arange(num_nodes, device=parents.device), right=True)
    starts = cu[seq_of_node]
    jump = torch.where(parents >= 0, parents + starts, -1)  # global id of the ancestor `depth` steps up, or -1
    depth = (parents >= 0).long()
    for _ in range(max(1, math.ceil(math.log2(max(num_nodes, 2))))):
        has = jump >= 0
        up = jump.clamp_min(0)
        depth, jump = depth + torch.where(has, depth[up], 0), torch.where(has, jump[up], -1)
    return depth


def _empty_result(cu_nodes: torch.Tensor, parents: torch.Tensor) -> SpecAcceptResult:
    num_seqs = cu_nodes.numel() - 1
    counts = cu_nodes[1:] - cu_nodes[:-1]
    assert bool((counts >= 1).all()), "every request needs its root node"
    depth = tree_depths(parents, cu_nodes)
    max_depth = int(depth.max()) if depth.numel() else 0
    device = parents.device
    return SpecAcceptResult(
        num_accepted=torch.zeros(num_seqs, dtype=torch.int64, device=device),
        accepted_nodes=torch.full((num_seqs, max_depth), -1, dtype=torch.int64, device=device),
        next_token=torch.zeros(num_seqs, dtype=torch.int64, device=device),
    )


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> int:
    """First token whose cumulative mass exceeds u·Σprobs (zero-mass tokens are never drawn)."""
    cdf = probs.float().cumsum(0)
    return min(int(torch.searchsorted(cdf, (u * cdf[-1]).reshape(1), right=True)), probs.numel() - 1)


def spec_accept_reference(
    tokens: torch.Tensor,
    parents: torch.Tensor,
    cu_nodes: torch.Tensor,
    target_probs: torch.Tensor,
    draft_probs: torch.Tensor | None,
    uniforms: torch.Tensor,
    final_uniforms: torch.Tensor,
    greedy: bool,
) -> SpecAcceptResult:
    """Walks each request's tree in Python; the vocabulary-sized work is vectorised in torch (fp32)."""
    assert greedy or draft_probs is not None, "sampling needs draft_probs"
    result = _empty_result(cu_nodes, parents)
    cu, parent_list, token_list = cu_nodes.tolist(), parents.tolist(), tokens.tolist()
    for s in range(len(cu) - 1):
        base, num_nodes = cu[s], cu[s + 1] - cu[s]
        children: list[list[int]] = [[] for _ in range(num_nodes)]
        for i in range(1, num_nodes):
            children[parent_list[base + i]].append(i)
        node, path = 0, []
        while True:
            if greedy:
                want = int(target_probs[base + node].argmax())  # only visited rows: most nodes never are
                child = next((c for c in children[node] if token_list[base + c] == want), None)
                if child is None:
                    next_token = want
                    break
            else:
                child, residual = _sample_children(
                    target_probs[base + node].float(), draft_probs[base + node].float(),
                    [(c, token_list[base + c], uniforms[base + c].float()) for c in children[node]],
                )  # fmt: skip
                if child is None:
                    next_token = inverse_cdf(residual, final_uniforms[s].float())
                    break
            path.append(child)
            node = child
        result.num_accepted[s] = len(path)
        result.accepted_nodes[s, : len(path)] = torch.tensor(path, dtype=torch.int64)
        result.next_token[s] = next_token
    return result


def _sample_children(
    residual: torch.Tensor,  # [vocab] R, starts as p[node]
    draft: torch.Tensor,  # [vocab] D, starts as q[node]
    children: list[tuple[int, int, torch.Tensor]],  # (node id, token, u) in node order
) -> tuple[int | None, torch.Tensor]:
    """The accepted child (or None) and the distribution to draw the next token from when none is."""
    if not bool(draft.sum() > 0):
        return None, residual
    for child, token, u in children:
        if bool((residual[token] > 0) & (u * draft[token] <= residual[token])):
            return child, residual
        leftover = (residual - draft).clamp_min(0.0)
        mass = leftover.sum()
        if bool(mass > 0):  # mass 0 only when R == D up to rounding: then R stays as it was
            residual = leftover / mass
        draft = draft.clone()
        draft[token] = 0.0
        draft_mass = draft.sum()
        if not bool(draft_mass > 0):
            break
        draft = draft / draft_mass
    return None, residual


def spec_accept_triton(
    tokens: torch.Tensor,
    parents: torch.Tensor,
    cu_nodes: torch.Tensor,
    target_probs: torch.Tensor,
    draft_probs: torch.Tensor | None,
    uniforms: torch.Tensor,
    final_uniforms: torch.Tensor,
    greedy: bool,
    block_vocab: int = 1024,
) -> SpecAcceptResult:
    num_nodes, vocab = target_probs.shape
    num_seqs = cu_nodes.numel() - 1
    assert greedy or draft_probs is not None, "sampling needs draft_probs"
    assert tokens.shape == parents.shape == uniforms.shape == (num_nodes,)
    assert final_uniforms.shape == (num_seqs,) and target_probs.stride(-1) == 1
    if draft_probs is None:
        draft_probs = target_probs  # a pointer the greedy kernel never reads
    assert draft_probs.shape == target_probs.shape and draft_probs.stride(-1) == 1
    result = _empty_result(cu_nodes, parents)
    if num_seqs == 0:
        return result
    # R and D live in a scratch row per request: the residual updates are vocabulary-wide and sequential.
    scratch_rows = 1 if greedy else num_seqs
    residual = torch.empty(scratch_rows, vocab, dtype=torch.float32, device=target_probs.device)
    draft = torch.empty_like(residual)
    _build(interpret_enabled())[(num_seqs,)](
        tokens, parents, cu_nodes, target_probs, draft_probs, uniforms, final_uniforms, residual, draft,
        result.num_accepted, result.accepted_nodes, result.next_token,
        vocab, target_probs.stride(0), draft_probs.stride(0), max(result.accepted_nodes.stride(0), 1),
        GREEDY=greedy, BLOCK_V=block_vocab,
    )  # fmt: skip
    return result


@functools.cache
def _build(interpret: bool):
    global tl
    triton, tl = load_triton()

    @triton.jit
    def spec_accept_kernel(
        tokens_ptr, parents_ptr, cu_nodes_ptr, p_ptr, q_ptr, u_ptr, final_u_ptr, residual_ptr, draft_ptr,
        num_accepted_ptr, accepted_ptr, next_token_ptr,
        vocab, stride_p, stride_q, stride_acc,
        GREEDY: tl.constexpr, BLOCK_V: tl.constexpr,
    ):  # fmt: skip
        seq = tl.program_id(0)
        base = tl.load(cu_nodes_ptr + seq).to(tl.int64)
        num_nodes = tl.load(cu_nodes_ptr + seq + 1).to(tl.int64) - base
        cols = tl.arange(0, BLOCK_V)
        r_row = residual_ptr + seq.to(tl.int64) * vocab
        d_row = draft_ptr + seq.to(tl.int64) * vocab
        node = tl.zeros([], tl.int64)
        depth = tl.zeros([], tl.int64)
        next_token = tl.zeros([], tl.int64)
        walking = num_nodes > 0
        while walking:
            p_row = p_ptr + (base + node) * stride_p
            child = tl.full([], -1, tl.int64)
            if GREEDY:
                # argmax p[node], first index on ties (as torch.argmax)
                best_val = tl.full([], float("-inf"), tl.float32)
                best = tl.zeros([], tl.int64)
                for start in range(0, vocab, BLOCK_V):
                    offs = start + cols
                    x = tl.load(p_row + offs, mask=offs < vocab, other=float("-inf")).to(tl.float32)
                    chunk_max = tl.max(x, 0)
                    chunk_arg = tl.argmax(x, 0, tie_break_left=True).to(tl.int64) + start
                    take = chunk_max > best_val
                    best = tl.where(take, chunk_arg, best)
                    best_val = tl.where(take, chunk_max, best_val)
                for i in range(node + 1, num_nodes):
                    hit = (tl.load(parents_ptr + base + i) == node) & (tl.load(tokens_ptr + base + i) == best)
                    child = tl.where(hit & (child < 0), i, child)
                next_token = best
            else:
                # R and D start as the rows p[node] and q[node] and are read from there until a reject first
                # rewrites them into this request's scratch rows: an accepted first child costs two loads.
                q_row = q_ptr + (base + node) * stride_q
                r_fresh = tl.full([], 1, tl.int1)
                d_fresh = tl.full([], 1, tl.int1)
                draft_mass = tl.zeros([], tl.float32)
                for start in range(0, vocab, BLOCK_V):
                    offs = start + cols
                    draft_mass += tl.sum(tl.load(q_row + offs, mask=offs < vocab, other=0.0).to(tl.float32), 0)
                trying = draft_mass > 0
                for i in range(node + 1, num_nodes):
                    if trying & (tl.load(parents_ptr + base + i) == node):
                        token = tl.load(tokens_ptr + base + i)
                        r = (tl.load(r_row + token, mask=~r_fresh, other=0.0)
                             + tl.load(p_row + token, mask=r_fresh, other=0.0).to(tl.float32))  # fmt: skip
                        d = (tl.load(d_row + token, mask=~d_fresh, other=0.0)
                             + tl.load(q_row + token, mask=d_fresh, other=0.0).to(tl.float32))  # fmt: skip
                        if (r > 0) & (tl.load(u_ptr + base + i).to(tl.float32) * d <= r):
                            child = i
                            trying = tl.full([], 0, tl.int1)
                        else:
                            # R <- norm(max(R - D, 0)), kept as is when that has no mass
                            mass = tl.zeros([], tl.float32)
                            for start in range(0, vocab, BLOCK_V):
                                offs = start + cols
                                ok = offs < vocab
                                rr = (tl.load(r_row + offs, mask=ok & ~r_fresh, other=0.0)
                                      + tl.load(p_row + offs, mask=ok & r_fresh, other=0.0).to(tl.float32))  # fmt: skip
                                dd = (tl.load(d_row + offs, mask=ok & ~d_fresh, other=0.0)
                                      + tl.load(q_row + offs, mask=ok & d_fresh, other=0.0).to(tl.float32))  # fmt: skip
                                mass += tl.sum(tl.maximum(rr - dd, 0.0), 0)
                            if mass > 0:
                                for start in range(0, vocab, BLOCK_V):
                                    offs = start + cols
                                    ok = offs < vocab
                                    rr = (tl.load(r_row + offs, mask=ok & ~r_fresh, other=0.0)
                                          + tl.load(p_row + offs, mask=ok & r_fresh, other=0.0).to(tl.float32))
                                    dd = (tl.load(d_row + offs, mask=ok & ~d_fresh, other=0.0)
                                          + tl.load(q_row + offs, mask=ok & d_fresh, other=0.0).to(tl.float32))
                                    tl.store(r_row + offs, tl.maximum(rr - dd, 0.0) / mass, mask=ok)
                                r_fresh = tl.full([], 0, tl.int1)
                            tl.debug_barrier()
                            # D[y] <- 0, D <- norm(D): the next sibling was drawn without replacement
                            draft_mass = tl.zeros([], tl.float32)
                            for start in range(0, vocab, BLOCK_V):
                                offs = start + cols
                                ok = offs < vocab
                                dd = (tl.load(d_row + offs, mask=ok & ~d_fresh, other=0.0)
                                      + tl.load(q_row + offs, mask=ok & d_fresh, other=0.0).to(tl.float32))  # fmt: skip
                                draft_mass += tl.sum(tl.where(offs == token, 0.0, dd), 0)
                            if draft_mass > 0:
                                for start in range(0, vocab, BLOCK_V):
                                    offs = start + cols
                                    ok = offs < vocab
                                    dd = (tl.load(d_row + offs, mask=ok & ~d_fresh, other=0.0)
                                          + tl.load(q_row + offs, mask=ok & d_fresh, other=0.0).to(tl.float32))
                                    tl.store(d_row + offs, tl.where(offs == token, 0.0, dd) / draft_mass, mask=ok)
                                d_fresh = tl.full([], 0, tl.int1)
                            tl.debug_barrier()
                            trying = draft_mass > 0
                if child < 0:
                    # recovered (or bonus) token: inverse CDF of R at u_final
                    total = tl.zeros([], tl.float32)
                    for start in range(0, vocab, BLOCK_V):
                        offs = start + cols
                        ok = offs < vocab
                        total += tl.sum(tl.load(r_row + offs, mask=ok & ~r_fresh, other=0.0)
                                        + tl.load(p_row + offs, mask=ok & r_fresh, other=0.0).to(tl.float32), 0)
                    threshold = tl.load(final_u_ptr + seq).to(tl.float32) * total
                    below = tl.zeros([], tl.int64)
                    running = tl.zeros([], tl.float32)
                    for start in range(0, vocab, BLOCK_V):
                        offs = start + cols
                        ok = offs < vocab
                        rr = (tl.load(r_row + offs, mask=ok & ~r_fresh, other=0.0)
                              + tl.load(p_row + offs, mask=ok & r_fresh, other=0.0).to(tl.float32))  # fmt: skip
                        cdf = running + tl.cumsum(rr, 0)
                        below += tl.sum(((cdf <= threshold) & ok).to(tl.int64), 0)
                        running += tl.sum(rr, 0)
                    next_token = tl.minimum(below, vocab - 1)
            if child >= 0:
                tl.store(accepted_ptr + seq.to(tl.int64) * stride_acc + depth, child)
                depth += 1
                node = child
            walking = child >= 0
        tl.store(num_accepted_ptr + seq, depth)
        tl.store(next_token_ptr + seq, next_token)

    return spec_accept_kernel
