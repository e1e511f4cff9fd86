"""Hybrid trees: one tree a step from suffix decoding's match and the draft head's branches, verified in one forward.

Greedy: both proposers grow their own tree to the step's budget; the two are merged as tries of token paths (a
path both proposed is one node) and every node keeps the higher of its proposers' estimates of being reached —
suffix decoding's count ratios along the match, the head's product of draft probabilities (tree_select.py). Since
a node's estimate never exceeds its parent's in either tree, the `max_nodes` best nodes form a tree: the merged
tree is cut to the adaptive budget by value alone. Each node is credited to the proposer whose estimate won, for
`usage`. The head's share of the budget is what the suffix's confident nodes (estimate ≥ `confident`) leave, so a
long match, where the suffix fills the tree alone, costs no head forwards.

Sampling: multi-draft verification needs every node's children drawn from one distribution q, which a merge of
two proposers' draws is not. So a sampled step takes the suffix tree whole when the context has a suffix match —
a choice made from counts only, never from a random draw, which keeps it lossless — and the head's tree otherwise.
"""

from __future__ import annotations

from dataclasses import replace

from specrelay.services.drafter.base import DraftInput, Verified
from specrelay.services.drafter.head import HeadProposer
from specrelay.services.drafter.suffix import SuffixProposer
from specrelay.shared.draft_tree import DraftTree


class HybridProposer:
    name = "hybrid"
    wants_hidden = True

    def __init__(self, suffix: SuffixProposer, head: HeadProposer, confident: float = 0.5):
        self.suffix, self.head = suffix, head
        self.confident = confident  # a suffix node estimated at least this likely is kept without the head's help

    def propose(self, inputs: list[DraftInput]) -> list[DraftTree]:
        suffix_trees = self.suffix.propose(inputs)
        out = []
        for inp, st in zip(inputs, suffix_trees):
            if not inp.params.greedy and st.num_nodes > 1:
                self.head.advance(inp)  # keep the head's context current for later steps
                out.append(st)
                continue
            if not inp.params.greedy:
                out.append(self.head.grow(inp)[0])
                continue
            # the head grows only what the suffix's confident nodes leave of the budget: a long match costs it nothing
            budget = inp.max_nodes - sum(v >= self.confident for v in st.values[1:])
            if budget <= 1:
                self.head.advance(inp)
                out.append(st)
                continue
            out.append(merge(st, self.head.grow(replace(inp, max_nodes=budget))[0], inp.max_nodes))
        return out

    def observe(self, verified: list[Verified]) -> None:
        self.suffix.observe(verified)
        self.head.observe(verified)

    def release(self, request_id: int) -> None:
        self.suffix.release(request_id)
        self.head.release(request_id)


def merge(suffix: DraftTree, head: DraftTree, max_nodes: int) -> DraftTree:
    """The two trees as one trie of token paths, each node at its best estimate, cut to `max_nodes` (greedy)."""
    best: dict[tuple[int, ...], tuple[float, str]] = {}
    for tree, source in ((suffix, "suffix"), (head, "head")):
        values = tree.values or [1.0] * tree.num_nodes
        paths: list[tuple[int, ...]] = [()]
        for i in range(1, tree.num_nodes):
            paths.append((*paths[tree.parents[i]], tree.tokens[i]))
            if paths[i] not in best or values[i] > best[paths[i]][0]:
                best[paths[i]] = (values[i], source)
    # best first; a shallower node first among equals, so a parent always precedes its children
    ranked = sorted(best.items(), key=lambda kv: (-kv[1][0], len(kv[0])))
    index: dict[tuple[int, ...], int] = {(): 0}
    tokens, parents, probs = [suffix.tokens[0]], [-1], [1.0]
    values, sources = [1.0], [""]
    for path, (value, source) in ranked:
        if len(tokens) >= max_nodes:
            break
        if path[:-1] not in index:  # its parent did not make the cut
            continue
        index[path] = len(tokens)
        parents.append(index[path[:-1]])
        tokens.append(path[-1])
        probs.append(value / values[parents[-1]] if values[parents[-1]] > 0 else 0.0)
        values.append(value)
        sources.append(source)
    return DraftTree(tokens, parents, probs, values=values, sources=sources)
