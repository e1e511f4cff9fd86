"""What every proposer shares: the request it drafts for, and the feedback it gets after verification."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from specrelay.shared.draft_tree import DraftTree
from specrelay.shared.sampling import SamplingParams
from specrelay.shared.seeded_draws import gumbel_noise


TOPK = 8  # candidates per node the verifier reports back (Token Recycling's k is at most this)


class DraftGrammar(Protocol):
    """A request's grammar state after its committed tokens (shared/grammar_mask.Constraint)."""

    def allowed_after(self, path: list[int]) -> torch.Tensor:
        """[vocab] bool: the tokens the grammar allows after the committed tokens and then `path` (the tokens
        from the root's child down to a node); all False when the path leaves the grammar or ends the turn."""
        ...


@dataclass
class DraftInput:
    request_id: int
    tokens: list[int]  # every committed token (prompt + output); the last one is the tree's root
    params: SamplingParams
    max_nodes: int  # the tree budget, root included
    generator: torch.Generator | None = None
    num_prompt_tokens: int = 0  # where the output starts in `tokens`: a grammar constrains the output only
    # Structured outputs: every proposal is masked with it (the target is masked alike, so a node the grammar
    # forbids could never be accepted; masking the draft spends the tree on nodes that can). None: free text.
    grammar: DraftGrammar | None = None
    # Set when the verifier draws this request's tokens from positional noise (shared/seeded_draws.py): drawing
    # the children with the same noise makes the first child the target's own draw whenever q agrees with p.
    positional_seed: int | None = None


def allowed_children(inp: DraftInput, path: list[int], width: int) -> torch.Tensor | None:
    """[width] bool: what the request's grammar lets a proposer put under the node at the end of `path` (sized
    to the proposer's vocabulary: ids past the grammar's are never allowed); None: no grammar, anything goes."""
    if inp.grammar is None:
        return None
    allowed = inp.grammar.allowed_after(path)
    if allowed.shape[0] >= width:
        return allowed[:width]
    return torch.cat([allowed, allowed.new_zeros(width - allowed.shape[0])])


@dataclass
class Verified:
    """What the verifier tells the proposer after a step."""

    request_id: int
    tree: DraftTree
    target_topk: torch.Tensor  # [num_nodes, TOPK] int64: the target's best tokens after every node, rejected too
    accepted_nodes: list[int]  # tree nodes accepted, root excluded, root-down
    # [1 + len(accepted_nodes), hidden]: the target's last normed hidden state at the root and each accepted node
    # (a draft head continues from it); None when the verifier did not send it
    hidden: torch.Tensor | None = None


class Proposer(Protocol):
    name: str

    def propose(self, inputs: list[DraftInput]) -> list[DraftTree]: ...

    def observe(self, verified: list[Verified]) -> None: ...

    def release(self, request_id: int) -> None: ...


def seeded_order(probs: torch.Tensor, k: int, seed: int, position: int) -> list[int]:
    """k tokens drawn from `probs` without replacement with the verifier's noise for `position` (Gumbel-top-k over
    the same Gumbel noise as the target's draw there): the first is the target's draw whenever q ranks it first."""
    k = min(k, int((probs > 0).sum()))
    keys = torch.log(probs) + gumbel_noise(seed, position, probs.shape[-1], probs.device)
    return keys.topk(k).indices.tolist()


def gumbel_order(probs: torch.Tensor, k: int, generator: torch.Generator | None) -> list[int]:
    """k tokens drawn from `probs` without replacement, in draw order (Gumbel-top-k: sorting log p + Gumbel
    noise is sequential sampling without replacement). Tokens of zero mass are never drawn."""
    k = min(k, int((probs > 0).sum()))
    gumbel = -torch.log(-torch.log(torch.rand(probs.shape, generator=generator).clamp_(1e-20, 1.0)))
    keys = torch.log(probs) + gumbel
    return keys.topk(k).indices.tolist()
