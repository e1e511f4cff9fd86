"""Rotary position embeddings (the HF/neox "rotate_half" convention) with linear and llama3 frequency scaling.

Scaling only changes the frequencies, so rotating a key by a position delta is a rotation by delta·inv_freq: that is
what lets relay reuse move cached keys to new positions (see `rope_shift`).
"""

from __future__ import annotations

import math

import torch

from specrelay.shared.modeling.config import ModelConfig
from specrelay.shared.rotary import rope_cos_sin, rotate_half  # the kernels rotate with these too


def inv_frequencies(cfg: ModelConfig) -> torch.Tensor:
    """[head_dim // 2] float32 angular frequencies, scaled as the config says."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = cfg.rope_scaling
    if scaling is None:
        return inv_freq
    factor = float(scaling["factor"])
    if scaling["rope_type"] == "linear":
        return inv_freq / factor
    # llama3 (Llama 3.1 report): keep high frequencies, divide low ones by `factor`, interpolate smoothly between.
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(is_medium, smoothed, scaled)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [num_tokens, num_heads, head_dim]; cos, sin: [num_tokens, head_dim]."""
    return x * cos[:, None, :] + rotate_half(x) * sin[:, None, :]


def rope_shift(keys: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Re-rotate keys that were rotated at position p so they read as rotated at p + delta.

    keys: [num_tokens, num_kv_heads, head_dim]; delta: [num_tokens] integer. Rotations compose:
    R(p + δ) = R(δ)·R(p), so applying R(δ) to the stored key is exact up to rounding. Math in float32.
    """
    cos, sin = rope_cos_sin(inv_freq, delta, torch.float32)
    return apply_rope(keys.float(), cos, sin).to(keys.dtype)
