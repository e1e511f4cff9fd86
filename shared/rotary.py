"""The arithmetic of rotary position embeddings (HF/neox "rotate_half" convention, Su et al., arXiv 2104.09864),
shared by the model (shared/modeling/rope.py: frequencies, scaling, applying it) and the kernels' references
(kernels/rope_shift.py), so that a kernel rotates keys exactly as the model did. Plain torch, no model config."""

from __future__ import annotations

import torch


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: [num_tokens, head_dim] for integer positions [num_tokens], computed in float32."""
    freqs = positions.to(torch.float32)[:, None] * inv_freq[None, :].to(positions.device)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)
