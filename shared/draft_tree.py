"""DraftTree: the handoff from a drafter to the verifier.

Node 0 is the root: the last committed token, whose KV the target has not computed yet, so one verify forward
over the tree yields the target's distribution after every node. A node's children were drawn from its draft
distribution q (without replacement, in node-index order) — that order is what lossless sampling verification
relies on (SpecInfer, arXiv 2305.09781).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class DraftTree:
    tokens: list[int]  # [num_nodes] token of each node; tokens[0] is the root
    parents: list[int]  # [num_nodes] parent index, -1 for the root, parents[i] < i
    draft_probs: list[float]  # [num_nodes] q(token | path to parent); 1.0 for the root
    q: torch.Tensor | None = None  # [num_nodes, vocab] processed draft distribution at each node (sampling only)
    values: list[float] = field(default_factory=list)  # [num_nodes] estimated chance the target reaches the node
    sources: list[str] | None = None  # [num_nodes] the proposer of each node ("" for the root): a hybrid's credit

    @classmethod
    def root_only(cls, token: int) -> DraftTree:
        return cls([token], [-1], [1.0], values=[1.0])

    @property
    def num_nodes(self) -> int:
        return len(self.tokens)

    def depths(self) -> list[int]:
        depth = [0] * self.num_nodes
        for i in range(1, self.num_nodes):
            depth[i] = depth[self.parents[i]] + 1
        return depth

    def ancestor_mask(self) -> torch.Tensor:
        """[num_nodes, num_nodes] bool: row i is True at i and every ancestor of i (tree attention)."""
        n = self.num_nodes
        mask = torch.eye(n, dtype=torch.bool)
        for i in range(1, n):
            mask[i] |= mask[self.parents[i]]
        return mask

    def path(self, node: int) -> list[int]:
        """Node indices from the root's first child down to `node`."""
        out = []
        while node > 0:
            out.append(node)
            node = self.parents[node]
        return out[::-1]
