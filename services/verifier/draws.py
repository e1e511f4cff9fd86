"""How the engine draws a request's tokens from the target's processed distribution, in one of three modes:

  greedy   the argmax;
  seeded   a seeded sampled request on an engine with positional seeds: the draw that the noise of its (seed,
           position) picks (shared/seeded_draws.py), whatever the tree, the batch or the drafter;
  sampled  from the request's own random stream, verified by speculative sampling's rejection rule.

A seeded tree is verified by the greedy walk over the target's draws as one-hot rows: a node is accepted iff it is
the draw after its parent's path, and the walk's next token is the draw where it stops.
"""

from __future__ import annotations

import torch

from specrelay.shared.draft_tree import DraftTree
from specrelay.shared.sampling import SamplingParams, sample
from specrelay.shared.seeded_draws import seeded_draws

MODES = ("greedy", "seeded", "sampled")


def draw_mode(params: SamplingParams, positional_seeds: bool) -> str:
    if params.greedy:
        return "greedy"
    return "seeded" if positional_seeds and params.seed is not None else "sampled"


def first_token(probs: torch.Tensor, params: SamplingParams, mode: str, position: int,
                generator: torch.Generator | None) -> int:
    """probs: [1, vocab] processed, after the prompt; position: the new token's index in the sequence."""
    if mode == "greedy":
        return int(probs.argmax(-1))
    if mode == "seeded":
        return int(seeded_draws(probs, params.seed, [position])[0])
    return int(sample(probs, generator))


def seeded_targets(probs: torch.Tensor, seed: int, num_tokens: int, tree: DraftTree) -> torch.Tensor:
    """probs: [num_nodes, vocab] processed, after every node; num_tokens: the sequence's length, its last token
    the root -> [num_nodes, vocab] one-hot rows of the target's draw after each node (drawn at num_tokens + the
    node's depth)."""
    draws = seeded_draws(probs, seed, [num_tokens + d for d in tree.depths()])
    return torch.nn.functional.one_hot(draws, probs.shape[-1]).to(probs.dtype)
