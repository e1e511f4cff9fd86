"""Draft-model proposers: a dynamic token tree (DySpec / EAGLE-2 style) and the classic chain.

The tree grows depth by depth, one batched draft forward per depth for every request: the `width` most valuable
nodes of the newest depth are fed to the draft model (tree attention over the nodes fed before), and each yields
`branch` children drawn from its distribution — greedy: its top tokens; sampling: draws without replacement from
the processed q. `select_tree` then keeps the best `max_nodes` of the pool. Growth stops early once no frontier node
can still make the cut (values only shrink with depth). The chain is width 1, branch 1.

The drafter keeps its own KV per request: committed tokens, then the tree nodes of the current step. After
verification it rolls back to the committed tokens; the next step feeds the newly committed ones first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specrelay.services.drafter.base import DraftInput, Verified, allowed_children, gumbel_order, seeded_order
from specrelay.services.drafter.tree_select import PoolNode, path_to, select_tree
from specrelay.shared.draft_tree import DraftTree
from specrelay.shared.modeling.kv_cache import BlockTable
from specrelay.shared.modeling.runner import ModelRunner, StepInput
from specrelay.shared.sampling import biased, finite_logits, processed_probs


@dataclass
class _Growth:
    """One request's tree while it grows."""

    inp: DraftInput
    table: BlockTable
    pool: list[PoolNode]
    fed: list[int]  # pool indices whose KV the draft cache holds after the committed tokens, in order
    frontier: list[int]  # pool indices to feed next
    logits: dict[int, torch.Tensor]  # pool index -> draft logits after it, for the nodes not yet expanded
    done: bool = False


class DraftModelProposer:
    def __init__(self, runner: ModelRunner, name: str = "tree", max_depth: int = 6, branch: int = 4,
                 width: int = 4):
        self.runner = runner
        self.name = name
        self.max_depth, self.branch, self.width = max_depth, branch, width
        self.tables: dict[int, BlockTable] = {}
        self.committed: dict[int, int] = {}  # request -> committed tokens held in its draft cache

    @classmethod
    def chain(cls, runner: ModelRunner, length: int = 4) -> DraftModelProposer:
        return cls(runner, name="chain", max_depth=length, branch=1, width=1)

    def propose(self, inputs: list[DraftInput]) -> list[DraftTree]:
        growths = [self._catch_up(inp) for inp in inputs]
        for depth in range(self.max_depth):
            for g in growths:
                if not g.done:
                    self._expand(g)
            if depth == self.max_depth - 1:
                break
            live = [g for g in growths if self._choose_frontier(g)]
            if not live:
                break
            logits = self.runner.forward([self._frontier_step(g) for g in live])
            for g, rows in zip(live, logits):
                g.logits.update(zip(g.frontier, rows))
                g.fed.extend(g.frontier)
        return [select_tree(g.pool, min(g.inp.max_nodes, self.max_nodes), not g.inp.params.greedy) for g in growths]

    @property
    def max_nodes(self) -> int:
        return 1 + sum(self.width * self.branch if d else self.branch for d in range(self.max_depth))

    def observe(self, verified: list[Verified]) -> None:
        for v in verified:  # roll back the tree; next step feeds the accepted tokens as committed ones
            if v.request_id in self.tables:  # a step with budget 1 drafts nothing
                self.runner.cache.truncate(self.tables[v.request_id], self.committed[v.request_id])

    def release(self, request_id: int) -> None:
        table = self.tables.pop(request_id, None)
        self.committed.pop(request_id, None)
        if table is not None:
            self.runner.release(table)

    def _catch_up(self, inp: DraftInput) -> _Growth:
        table = self.tables.setdefault(inp.request_id, BlockTable())
        if table.num_tokens >= len(inp.tokens):  # nothing new: recompute the root to get its logits
            self.runner.cache.truncate(table, len(inp.tokens) - 1)
        new = inp.tokens[table.num_tokens :]
        if len(new) > self.runner.prefill_chunk:
            logits = self.runner.prefill(table, new)
        else:
            logits = self.runner.forward([StepInput(table, new)])[0][-1]
        self.committed[inp.request_id] = table.num_tokens
        root = PoolNode(token=inp.tokens[-1], parent=-1, q_prob=1.0, value=1.0)
        return _Growth(inp, table, [root], fed=[], frontier=[0], logits={0: logits})

    def _expand(self, g: _Growth) -> None:
        """Draw the children of every frontier node from the draft logits after it."""
        for node_id in g.frontier:
            node = g.pool[node_id]
            logits = g.logits.pop(node_id)
            allowed = allowed_children(g.inp, path_to(g.pool, node_id), logits.shape[-1])
            if allowed is not None:  # the draft distribution is the masked one: what verification assumes
                allowed = allowed.to(logits.device)
                logits = logits.masked_fill(~allowed, float("-inf"))
            if g.inp.params.greedy:  # rank by the draft's own softmax: a one-hot q would rank nothing
                # (NaN/inf logits as the sampler reads them; a row with nothing finite ranks nothing: q_prob 0)
                probs = torch.softmax(finite_logits(biased(logits.float(), g.inp.params)), dim=-1).nan_to_num(0.0)
                kids = probs.topk(self.branch).indices.tolist()
            else:
                probs = processed_probs(logits[None], g.inp.params)[0]
                if allowed is not None:  # a row with nothing finite falls back to a one-hot the grammar may forbid
                    probs = probs * allowed
                    probs = probs / probs.sum().clamp_min(1e-30)
                if g.inp.positional_seed is None:
                    kids = gumbel_order(probs, self.branch, g.inp.generator)
                else:  # its children sit one after it: the root's at len(tokens)
                    position = len(g.inp.tokens) + len(path_to(g.pool, node_id))
                    kids = seeded_order(probs, self.branch, g.inp.positional_seed, position)
                node.q = probs
            if allowed is not None:
                kids = [tok for tok in kids if probs[tok] > 0]
            for tok in kids:
                q_prob = float(probs[tok])
                node.children.append(len(g.pool))
                g.pool.append(PoolNode(token=tok, parent=node_id, q_prob=q_prob, value=node.value * q_prob))

    def _choose_frontier(self, g: _Growth) -> bool:
        """The `width` most valuable unexpanded nodes of the newest depth — unless none can still enter the tree."""
        newest = [c for f in g.frontier for c in g.pool[f].children]
        newest.sort(key=lambda i: -g.pool[i].value)
        budget = min(g.inp.max_nodes, self.max_nodes)
        values = sorted((n.value for n in g.pool), reverse=True)
        cutoff = values[budget - 1] if len(values) >= budget else 0.0
        g.frontier = [i for i in newest[: self.width] if g.pool[i].value > cutoff]
        g.done = not g.frontier
        return not g.done

    def _frontier_step(self, g: _Growth) -> StepInput:
        fed, frontier, pool = g.fed, g.frontier, g.pool
        committed = g.table.num_tokens - len(fed)
        mask = torch.zeros(len(frontier), len(fed) + len(frontier), dtype=torch.bool)
        slot_of = {p: j for j, p in enumerate(fed)}
        depths = []
        for i, node in enumerate(frontier):
            mask[i, len(fed) + i] = True
            depth, a = 0, node
            while pool[a].parent >= 0:
                depth += 1
                a = pool[a].parent
                if a in slot_of:
                    mask[i, slot_of[a]] = True
            depths.append(depth)
        # the root is the last committed token, at position committed - 1; a node at depth d sits d after it
        return StepInput(g.table, [pool[n].token for n in frontier], positions=[committed - 1 + d for d in depths],
                         tree_mask=mask, mask_start=committed, logits_rows=list(range(len(frontier))))
