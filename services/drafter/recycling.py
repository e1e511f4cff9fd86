"""Token Recycling (arXiv 2408.08696): a model-free drafter that reuses the target's own candidate tokens.

An adjacency matrix keeps, for every token, the top-k tokens the target ranked after it the last time it saw that
token — refreshed from every verify forward, rejected tree nodes included, and kept across requests (hot start).
A tree grows from the root by following rows. Beyond the paper: instead of a static template, the same DySpec heap
as the draft-model tree picks the slots, with a learned prior π_r = P(target's choice is the rank-r candidate)
standing in for draft probabilities; under sampling, children are drawn without replacement from q ∝ π over the
row's candidates, so multi-draft speculative sampling stays lossless.
"""

from __future__ import annotations

import torch

from specrelay.services.drafter.base import TOPK, DraftInput, Verified, allowed_children, gumbel_order
from specrelay.services.drafter.tree_select import PoolNode, path_to, select_tree
from specrelay.shared.draft_tree import DraftTree


class TokenRecyclingProposer:
    name = "recycle"

    def __init__(self, vocab_size: int, k: int = TOPK, max_nodes: int = 64):
        self.k, self.max_nodes = k, max_nodes
        self.adjacency = torch.full((vocab_size, k), -1, dtype=torch.int64)  # [vocab, k] successors by rank
        # Laplace-smoothed hit counts per rank; the start favours rank 0 as the paper's template does
        self.rank_hits = torch.tensor([4.0 / (r + 1) for r in range(k)])
        self.rank_trials = torch.full((k,), 8.0)

    @property
    def rank_prior(self) -> torch.Tensor:  # [k] π_r
        return self.rank_hits / self.rank_trials

    def propose(self, inputs: list[DraftInput]) -> list[DraftTree]:
        return [self._grow(inp) for inp in inputs]

    def _grow(self, inp: DraftInput) -> DraftTree:
        pool = [PoolNode(token=inp.tokens[-1], parent=-1, q_prob=1.0, value=1.0)]
        prior = self.rank_prior
        vocab = self.adjacency.shape[0]

        def expand(node_id: int) -> None:
            node = pool[node_id]
            row = self.adjacency[node.token]
            valid = row >= 0
            if (allowed := allowed_children(inp, path_to(pool, node_id), vocab)) is not None:
                valid &= allowed[row.clamp(min=0)]  # the prior renormalised over what the grammar allows
            if not bool(valid.any()):
                return
            weights = torch.where(valid, prior, torch.zeros_like(prior))
            weights = weights / weights.sum()
            if inp.params.greedy:
                ranks = [r for r in range(self.k) if bool(valid[r])]
            else:
                ranks = gumbel_order(weights, self.k, inp.generator)
                node.q = torch.zeros(vocab).index_put_((row[valid],), weights[valid])  # a row never repeats a token
            for r in ranks:
                q_prob = float(weights[r])
                node.children.append(len(pool))
                pool.append(PoolNode(token=int(row[r]), parent=node_id, q_prob=q_prob, value=node.value * q_prob))

        return select_tree(pool, min(inp.max_nodes, self.max_nodes), not inp.params.greedy, expand=expand)

    def observe(self, verified: list[Verified]) -> None:
        for v in verified:
            tokens = torch.tensor(v.tree.tokens)
            top = v.target_topk[:, : self.k].cpu()  # [num_nodes, k]
            # score the rows the tree was drawn from, then refresh them (rejected nodes too, as the paper does)
            rows = self.adjacency[tokens]
            hit = rows == top[:, :1]  # [num_nodes, k]: which rank held the target's first choice
            known = (rows >= 0).any(-1)
            self.rank_hits += hit[known].float().sum(0)
            self.rank_trials += known.sum()
            self.adjacency[tokens] = top

    def release(self, request_id: int) -> None:
        """The matrix is shared by every request: nothing to free."""
