"""Suffix decoding (SuffixDecoding, arXiv 2411.04975): a model-free drafter that continues the context the way the
same text continued before — earlier in this request, or in any earlier request of this server.

Two suffix trees (suffix_tree.py): one per request over its prompt and output, and one global over the outputs of
all requests, active and finished, bounded by `max_global_tokens` (the oldest request's output goes first). Every
step, for each tree and each pattern length m (the context's last m tokens, while they occur), the greedy path
through the most frequent continuations is scored by Σ of its estimated reach probabilities, with at most
⌊max_spec_factor · m + max_spec_offset⌋ tokens (the paper's adaptive size: a longer match earns a longer draft) and
only while a path's probability, the product of count(child) / count(node), stays ≥ `min_token_prob`. The best
(tree, m) wins; its candidate tree is then grown by the same DySpec heap as the other proposers (tree_select.py)
with the counts as estimates, so the verifier's adaptive budget can cut it to any prefix.

Lossless under sampling: the tree and match are chosen from counts alone (never from a random draw), and each
node's children are drawn without replacement from q ∝ counts over its continuations, carried as the node's draft
distribution, so multi-draft speculative sampling verifies them exactly (as Token Recycling's rows are).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from specrelay.services.drafter.base import DraftInput, Verified, allowed_children, gumbel_order
from specrelay.services.drafter.suffix_tree import Node, SuffixTree
from specrelay.services.drafter.tree_select import PoolNode, path_to, select_tree
from specrelay.shared.draft_tree import DraftTree


@dataclass
class _Request:
    local: SuffixTree  # this request's prompt (its last max_local_tokens) and output
    seen: int  # tokens of the context indexed so far
    output_start: int  # context index of the first output token: what the global tree gets
    global_key: int  # its sequence's key in the global tree
    evicted: bool = False  # its output left the global tree while it ran: add no more of it


@dataclass
class Match:
    score: float  # Σ estimated reach probability of the greedy path: the expected accepted tokens
    node: Node  # the suffix-tree node of the matched pattern
    max_tokens: int  # the size this match earns


class SuffixProposer:
    name = "suffix"

    def __init__(self, vocab_size: int, max_depth: int = 24, max_spec_factor: float = 2.0,
                 max_spec_offset: float = 0.0, min_token_prob: float = 0.1, max_global_tokens: int = 16384,
                 max_local_tokens: int = 4096):
        if not 0 <= min_token_prob <= 1:
            raise ValueError(f"min_token_prob {min_token_prob}: must be in [0, 1]")
        self.vocab_size = vocab_size
        self.max_depth = max_depth
        # 2, not Arctic's 1: our adaptive budget cuts the tree to what pays on this device, so a larger candidate
        # costs little, and on the embedded pair's agentic prompts it lifts accepted tokens per step by a quarter
        self.max_spec_factor, self.max_spec_offset = max_spec_factor, max_spec_offset
        self.min_token_prob = min_token_prob
        self.max_global_tokens = max_global_tokens
        self.max_local_tokens = max_local_tokens  # a long prompt's older part is left out: memory and insert time
        self.global_tree = SuffixTree(max_depth)
        self.requests: dict[int, _Request] = {}
        self._keys = itertools.count()

    def propose(self, inputs: list[DraftInput]) -> list[DraftTree]:
        for inp in inputs:
            self._index(inp.request_id, inp.tokens)
        return [self._grow(inp) for inp in inputs]

    def observe(self, verified: list[Verified]) -> None:
        """Accepted tokens arrive with the next propose's context: nothing to learn here."""

    def release(self, request_id: int) -> None:
        """The request's own tree goes; its output stays in the global tree until evicted."""
        self.requests.pop(request_id, None)

    def _index(self, request_id: int, tokens: list[int]) -> None:
        req = self.requests.get(request_id)
        if req is not None and (len(tokens) < req.seen or tokens[req.seen - 1] != req.local.seqs[0][-1]):
            req = None  # not a continuation of what was indexed (a request id reused by a restarted client)
        if req is None:
            # Output starts after the prompt and the token prefill committed, which is the last one at the first
            # draft; a request first drafted later counts a few output tokens as prompt.
            start = max(0, len(tokens) - self.max_local_tokens)
            req = self.requests[request_id] = _Request(SuffixTree(self.max_depth), start, len(tokens) - 1,
                                                       next(self._keys))
        req.local.extend(0, tokens[req.seen :])
        self._add_global(req, tokens[max(req.seen, req.output_start) :])
        req.seen = len(tokens)

    def _add_global(self, req: _Request, tokens: list[int]) -> None:
        tree = self.global_tree
        for token in tokens:
            if req.evicted or self.max_global_tokens <= 0:
                return
            while tree.num_tokens >= self.max_global_tokens:  # oldest first: insertion order
                oldest = next(iter(tree.seqs))
                if oldest == req.global_key:  # one request's output fills the budget: keep what it has
                    return
                tree.remove(oldest)
                evicted = next((r for r in self.requests.values() if r.global_key == oldest), None)
                if evicted is not None:
                    evicted.evicted = True
            tree.append(req.global_key, token)

    def best_match(self, tree: SuffixTree, context: list[int], max_tokens: int) -> Match | None:
        best = None
        for m, node in enumerate(tree.matches(context, self.max_depth - 1), 1):
            size = min(max_tokens, int(m * self.max_spec_factor + self.max_spec_offset + 1e-6))
            score = self._path_score(node, size)
            if score > 0 and (best is None or score >= best.score):  # ties: the longer, more specific match
                best = Match(score, node, size)
        return best

    def _path_score(self, node: Node, size: int) -> float:
        score, prob = 0.0, 1.0
        for _ in range(size):
            if not node.children:
                break
            child = max(node.children.values(), key=lambda c: c.count)
            prob *= child.count / node.count
            if prob < self.min_token_prob:
                break
            score += prob
            node = child
        return score

    def _grow(self, inp: DraftInput) -> DraftTree:
        root = inp.tokens[-1]
        if inp.max_nodes <= 1:
            return DraftTree.root_only(root)
        req = self.requests[inp.request_id]
        matches = [self.best_match(t, inp.tokens, inp.max_nodes - 1) for t in (req.local, self.global_tree)]
        match = max((m for m in matches if m is not None), key=lambda m: m.score, default=None)
        if match is None:
            return DraftTree.root_only(root)
        sampling = not inp.params.greedy
        pool = [PoolNode(token=root, parent=-1, q_prob=1.0, value=1.0)]
        states = [match.node]  # the suffix-tree node under each pool node

        def expand(i: int) -> None:
            node, parent = states[i], pool[i]
            allowed = allowed_children(inp, path_to(pool, i), self.vocab_size)
            kids = sorted(((tok, c) for tok, c in node.children.items()
                           if parent.value * c.count / node.count >= self.min_token_prob
                           and (allowed is None or (tok < self.vocab_size and bool(allowed[tok])))),
                          key=lambda kv: -kv[1].count)
            if not kids:
                return
            total = sum(c.count for _, c in kids)
            if sampling:  # children are a draw without replacement from q ∝ counts: what verification assumes
                weights = torch.tensor([c.count / total for _, c in kids])
                parent.q = torch.zeros(self.vocab_size).index_put_((torch.tensor([t for t, _ in kids]),), weights)
                kids = [kids[j] for j in gumbel_order(weights, len(kids), inp.generator)]
            for tok, c in kids:
                estimate = c.count / node.count
                parent.children.append(len(pool))
                pool.append(PoolNode(token=tok, parent=i, q_prob=c.count / total if sampling else estimate,
                                     value=parent.value * estimate))
                states.append(c)

        tree = select_tree(pool, min(inp.max_nodes, 1 + match.max_tokens), sampling, expand=expand)
        tree.sources = [""] + [self.name] * (tree.num_nodes - 1)
        return tree
