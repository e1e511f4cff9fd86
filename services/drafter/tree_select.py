"""Choosing which drafted candidates form the tree: DySpec's greedy heap (arXiv 2410.11744).

A candidate pool holds, for every expanded node, its children in the order they were drawn from the node's draft
distribution q. A *slot* is "the k-th child of node c"; the chance that verification ever tries it is

    reach(c, k) = value(c) · (1 − Σ_{i<k} q_c(y_i))          value(root) = 1

(each earlier sibling was rejected, approximating acceptance by q), and the expected accepted tokens of the tree
are Σ value(y) with value(y_k) = value(c) · q_c(y_k) — the product of draft probabilities along the path
(EAGLE-2's score). The heap pops the slot of highest reach, adds its child, and pushes the next sibling's slot and
the child's first slot. Reach never depends on the token that fills the slot, so which slots get filled never
depends on what was drawn into them: that keeps multi-draft speculative sampling unbiased. Reach values only
decrease along the heap, so the greedy choice is optimal under the approximation.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from specrelay.shared.draft_tree import DraftTree


@dataclass
class PoolNode:
    token: int
    parent: int  # pool index, -1 for the root
    q_prob: float  # q_parent(token): the mass of this token in its parent's draft distribution
    value: float  # product of q along the path
    children: list[int] = field(default_factory=list)  # pool indices, in draw order
    q: torch.Tensor | None = None  # [vocab] processed draft distribution at this node, once expanded


def path_to(pool: list[PoolNode], node: int) -> list[int]:
    """The tokens from the root's child down to pool node `node` (empty for the root)."""
    path = []
    while pool[node].parent >= 0:
        path.append(pool[node].token)
        node = pool[node].parent
    return path[::-1]


def select_tree(pool: list[PoolNode], max_nodes: int, with_q: bool,
                expand: Callable[[int], None] | None = None) -> DraftTree:
    """The DySpec heap over the pool (pool[0] is the root); returns at most `max_nodes` nodes in pop order, so
    parents come before children and siblings keep their draw order. `expand(i)`, when given, draws the children
    of pool node i the first time it is chosen (proposers whose expansion costs nothing grow the pool lazily)."""
    chosen = [0]
    heap: list[tuple[float, int, int, int]] = []  # (-reach, tie-break, parent pool index, sibling rank k)
    counter = 0

    def push_slot(parent: int, k: int, reach: float) -> None:
        nonlocal counter
        if k < len(pool[parent].children) and reach > 0:
            heapq.heappush(heap, (-reach, counter, parent, k))
            counter += 1

    if expand is not None:
        expand(0)
    push_slot(0, 0, 1.0)
    while heap and len(chosen) < max_nodes:
        neg_reach, _, parent, k = heapq.heappop(heap)
        child = pool[parent].children[k]
        chosen.append(child)
        if expand is not None and len(chosen) < max_nodes:
            expand(child)
        push_slot(parent, k + 1, -neg_reach - pool[parent].value * pool[child].q_prob)
        push_slot(child, 0, pool[child].value)

    index = {p: i for i, p in enumerate(chosen)}
    q = None
    vocab = next((pool[p].q.shape[-1] for p in chosen if pool[p].q is not None), None)
    if with_q and vocab is not None:
        q = torch.zeros(len(chosen), vocab)
        for i, p in enumerate(chosen):
            if pool[p].q is not None:
                q[i] = pool[p].q
    return DraftTree(
        tokens=[pool[p].token for p in chosen],
        parents=[-1] + [index[pool[p].parent] for p in chosen[1:]],
        draft_probs=[pool[p].q_prob for p in chosen],
        q=q,
        values=[pool[p].value for p in chosen],
    )
