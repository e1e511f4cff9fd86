"""The draft-head proposer: an EAGLE-style head (shared/modeling/draft_head.py) grows each request's tree with the
DySpec heap.

It continues from the target's own last hidden states, which the verifier sends with every `Verified` (the root's
and each accepted node's). A step's hidden states pair with the tokens that follow them — the last of which, the
bonus token, only arrives with the next step's context — so `observe` queues them and `propose` feeds the pairs
(h_p, x_{p+1}) through the head, extending its per-request keys and values, up to the root. A request whose
hidden states are missing (its first step after prefill, a lost feedback message) drafts nothing that step.

Lossless under sampling: node children are drawn without replacement from the head's processed distribution q
(zero outside the draft vocabulary), carried as the node's q, and the heap picks slots by reach alone
(tree_select.py), as for the draft-model tree.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from specrelay.services.drafter.base import DraftInput, Verified, gumbel_order
from specrelay.shared.modeling.draft_head import DraftHead
from specrelay.services.drafter.tree_select import PoolNode, select_tree
from specrelay.shared.draft_tree import DraftTree
from specrelay.shared.sampling import processed_probs


@dataclass
class _State:
    keys: torch.Tensor  # [num_fed, H_kv, D] the head's keys at the positions fed so far
    values: torch.Tensor  # [num_fed, H_kv, D]
    pending: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (position p, target h_p) not yet fed
    root_pos: int = -1  # the position of the last tree's root (where the next hidden states start)
    root_feature: torch.Tensor | None = None  # [d] the head's f' at the root: its children's distribution
    fed_upto: int = -1  # the last position whose pair was fed


@dataclass
class _Node:  # the head's work per pool node
    feature: torch.Tensor  # [d] f'
    k: torch.Tensor  # [1, H_kv, D] its key and value (root: none, it is in the context)
    v: torch.Tensor
    position: int


class HeadProposer:
    name = "head"
    wants_hidden = True  # the verifier sends the target's hidden states with feedback

    def __init__(self, head: DraftHead, branch: int = 4, max_depth: int = 8, max_context: int = 1024, width: int = 4):
        self.head = head
        self.branch, self.max_depth, self.max_context, self.width = branch, max_depth, max_context, width
        self.vocab_size = head.cfg.vocab_size
        self.states: dict[int, _State] = {}

    def propose(self, inputs: list[DraftInput]) -> list[DraftTree]:
        with torch.inference_mode():
            return [self.grow(inp)[0] for inp in inputs]

    def observe(self, verified: list[Verified]) -> None:
        for v in verified:
            state = self.states.get(v.request_id)
            if state is None or v.hidden is None or state.root_pos < 0:
                continue
            state.pending += [(state.root_pos + j, h) for j, h in enumerate(v.hidden)]

    def release(self, request_id: int) -> None:
        self.states.pop(request_id, None)

    def grow(self, inp: DraftInput) -> tuple[DraftTree, list[PoolNode]]:
        """The request's tree (and the pool it came from: the hybrid proposer reads the head's values there)."""
        root = inp.tokens[-1]
        state = self.advance(inp)
        if inp.max_nodes <= 1 or state.root_feature is None:
            return DraftTree.root_only(root), [PoolNode(root, -1, 1.0, 1.0)]
        if inp.params.greedy:
            pool = self._grow_levels(inp, state)
            tree = select_tree(pool, inp.max_nodes, False)
            tree.sources = [""] + [self.name] * (tree.num_nodes - 1)
            return tree, pool
        pool = [PoolNode(token=root, parent=-1, q_prob=1.0, value=1.0)]
        work: list[_Node | None] = [_Node(state.root_feature, state.keys[:0], state.values[:0], len(inp.tokens) - 1)]
        depth = [0]

        def expand(i: int) -> None:  # sampling: one head forward per chosen node, its feature, then its children
            if depth[i] >= self.max_depth:
                return
            if work[i] is None:
                parent = pool[i].parent
                work[i] = self._feed_node(state, self._ancestors(pool, work, parent), work[parent], pool[i].token)
            kids, probs = self._children(self.head.logits(work[i].feature[None])[0], inp)
            for tok, q_prob in kids:
                pool[i].children.append(len(pool))
                pool.append(PoolNode(token=tok, parent=i, q_prob=q_prob, value=pool[i].value * q_prob))
                depth.append(depth[i] + 1)
                work.append(None)
            pool[i].q = probs

        tree = select_tree(pool, inp.max_nodes, not inp.params.greedy, expand=expand)
        tree.sources = [""] + [self.name] * (tree.num_nodes - 1)
        return tree, pool

    def _grow_levels(self, inp: DraftInput, state: _State) -> list[PoolNode]:
        """Greedy: the pool grows depth by depth, the `width` best nodes of the newest depth fed to the head in one
        call (EAGLE-2's expansion); stops once none of them can still make the budget's cut (values only shrink)."""
        root_pos, ids = len(inp.tokens) - 1, self.head.vocab_ids.tolist()
        pool = [PoolNode(token=inp.tokens[-1], parent=-1, q_prob=1.0, value=1.0)]
        feats, fed, node_k, node_v, frontier = {0: state.root_feature}, [], [], [], [0]
        for depth in range(self.max_depth):
            top = torch.softmax(self.head.logits(torch.stack([feats[i] for i in frontier])), -1).topk(self.branch)
            for row, i in enumerate(frontier):
                for p, j in zip(top.values[row].tolist(), top.indices[row].tolist()):
                    pool[i].children.append(len(pool))
                    pool.append(PoolNode(token=ids[j], parent=i, q_prob=p, value=pool[i].value * p))
            values = sorted((n.value for n in pool), reverse=True)
            cutoff = values[inp.max_nodes - 1] if len(values) >= inp.max_nodes else 0.0
            newest = sorted((c for i in frontier for c in pool[i].children), key=lambda c: -pool[c].value)
            frontier = [c for c in newest[: self.width] if pool[c].value > cutoff]
            if not frontier or depth == self.max_depth - 1:
                break
            # each frontier node attends to the context, its ancestors fed at earlier depths, and itself
            x, q, k, v = self.head.qkv(torch.stack([feats[pool[c].parent] for c in frontier]),
                                       torch.tensor([pool[c].token for c in frontier]),
                                       torch.full((len(frontier),), root_pos + depth + 1))
            ctx, slot = state.keys.shape[0], {p: j for j, p in enumerate(fed)}
            mask = torch.zeros(len(frontier), ctx + len(fed) + len(frontier), dtype=torch.bool)
            mask[:, :ctx] = True
            for r, c in enumerate(frontier):
                mask[r, ctx + len(fed) + r] = True
                a = pool[c].parent
                while a > 0:
                    mask[r, ctx + slot[a]] = True
                    a = pool[a].parent
            node_k.append(k)
            node_v.append(v)
            out = self.head.finish(x, q, torch.cat([state.keys, *node_k]), torch.cat([state.values, *node_v]), mask)
            fed += frontier
            feats.update(zip(frontier, out))
        return pool

    def _children(self, logits: torch.Tensor, inp: DraftInput) -> tuple[list[tuple[int, float]], torch.Tensor | None]:
        """logits: [draft_vocab] -> [(target token, q mass)] in draw order, and q over the target's vocabulary
        (sampling only)."""
        ids = self.head.vocab_ids
        if inp.params.greedy:
            probs = torch.softmax(logits, -1)
            top = probs.topk(self.branch)
            return [(int(ids[j]), float(p)) for j, p in zip(top.indices, top.values)], None
        full = torch.full((self.vocab_size,), float("-inf"))
        full[ids] = logits
        q = processed_probs(full[None], inp.params)[0]
        return [(t, float(q[t])) for t in gumbel_order(q, self.branch, inp.generator)], q

    def _ancestors(self, pool: list[PoolNode], work: list[_Node], i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of node i and its ancestors below the root, root-down: what its children attend to."""
        chain = []
        while i > 0:
            chain.append(i)
            i = pool[i].parent
        chain.reverse()
        if not chain:
            return work[0].k, work[0].v
        return torch.cat([work[j].k for j in chain]), torch.cat([work[j].v for j in chain])

    def _feed_node(self, state: _State, ancestors, parent: _Node, token: int) -> _Node:
        position = parent.position + 1
        x, q, k, v = self.head.qkv(parent.feature[None], torch.tensor([token]), torch.tensor([position]))
        keys = torch.cat([state.keys, ancestors[0], k])
        values = torch.cat([state.values, ancestors[1], v])
        feature = self.head.finish(x, q, keys, values, None)[0]
        return _Node(feature, k, v, position)

    def advance(self, inp: DraftInput) -> _State:
        """Feed the queued (h_p, x_{p+1}) pairs up to the root; the root's feature is then current, or None."""
        tokens = inp.tokens
        root_pos = len(tokens) - 1
        state = self.states.get(inp.request_id)
        if state is None:
            c = self.head.cfg
            empty = torch.zeros(0, c.num_kv_heads, c.head_dim)
            state = self.states[inp.request_id] = _State(empty, empty.clone())
        pairs = [(p, h) for p, h in state.pending if state.fed_upto < p + 1 <= root_pos]
        state.pending, state.root_pos = [], root_pos
        if pairs:
            feats = torch.stack([h for _, h in pairs]).float()
            positions = torch.tensor([p + 1 for p, _ in pairs])
            x, q, k, v = self.head.qkv(feats, torch.tensor([tokens[p + 1] for p, _ in pairs]), positions)
            keys, values = torch.cat([state.keys, k]), torch.cat([state.values, v])
            past = state.keys.shape[0]
            mask = torch.ones(len(pairs), past + len(pairs), dtype=torch.bool)
            mask[:, past:] = torch.ones(len(pairs), len(pairs), dtype=torch.bool).tril()
            out = self.head.finish(x, q, keys, values, mask)
            state.keys, state.values = keys[-self.max_context :], values[-self.max_context :]
            state.fed_upto = pairs[-1][0] + 1
            state.root_feature = out[-1]
        if state.fed_upto != root_pos:  # the hidden states up to the root are missing: no feature to draft from
            state.root_feature = None
        return state
