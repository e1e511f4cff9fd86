"""Seeded sampling that no tree, batch or drafter can change: the token at sequence position n is
argmax_x(log p(x) + G_n(x)), with G_n Gumbel noise from a generator seeded by (seed, n) alone.

Gumbel-max: for i.i.d. standard Gumbel G(x), argmax_x(log p(x) + G(x)) is an exact draw from p (Gumbel 1954;
the "Gumbel-max trick"). The noise of one position is independent of every other position's, so a sequence drawn
this way follows the target's autoregressive law, and its n-th token is a function of (seed, n, the tokens before
it) — whatever was drafted, whatever else runs beside it. Verifying a draft tree then needs no rejection sampling:
a node is accepted iff its token is the target's noise-determined draw after its parent's path (the greedy walk
over these draws). The price: a draft token is accepted only when it *equals* that draw, not with probability
min(1, p/q) as in speculative sampling.
"""

from __future__ import annotations

import torch

_MASK64 = (1 << 64) - 1


def position_seed(seed: int, position: int) -> int:
    """A 64-bit generator seed for (request seed, sequence position) (splitmix64's finaliser: nearby inputs give
    unrelated seeds)."""
    z = (seed * 0x9E3779B97F4A7C15 + (position + 1) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & 0x7FFF_FFFF_FFFF_FFFF


def gumbel_noise(seed: int, position: int, vocab: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """[vocab] float32 standard Gumbel noise for one position. Drawn on the CPU so that every replica, whatever its
    device, draws the same tokens for the same request."""
    generator = torch.Generator().manual_seed(position_seed(seed, position))
    uniform = torch.rand(vocab, generator=generator).clamp_(min=1e-20)
    return (-torch.log(-torch.log(uniform))).to(device)


def seeded_draws(probs: torch.Tensor, seed: int, positions: list[int]) -> torch.Tensor:
    """probs: [num_rows, vocab] processed distributions; positions[i]: the sequence position of the token drawn
    from row i -> token ids [num_rows]. Rows of the same position share their noise (different paths of a tree
    draw the same position)."""
    vocab = probs.shape[-1]
    noise = {n: gumbel_noise(seed, n, vocab, probs.device) for n in sorted(set(positions))}
    keys = torch.log(probs.float()) + torch.stack([noise[n] for n in positions])
    return keys.argmax(-1)
