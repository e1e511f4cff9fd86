"""Which relayed tokens a downstream prefill recomputes: CacheBlend's top-r% rule and RelayCaching's
deviation ∪ influence rule. Plain tensor maths over what the check layer measured; no model code here.

Both rules look at a *check layer*, where every relayed token has been run afresh in the new context, so its fresh
value vector can be compared with the relayed one:

- CacheBlend (Yao et al., arXiv 2405.16444, §4.2): KV deviation of token j = ‖V_fresh[j] − V_relayed[j]‖²; keep the
  r·n tokens with the largest deviation (r ≈ 15%) and recompute only those in later layers.
- RelayCaching (Geng et al., arXiv 2603.13289): deviation of token j = 1 − cos(V_fresh[j], V_relayed[j]); the
  deviations caused by the new prefix are sparse, so a token is recomputed when its deviation is ≥ α·mean (α = 1.5),
  or when it matters downstream: its influence, the attention it receives from the last w "suffix" tokens
  (w ≈ 10), summed over layers and heads, is ≥ β·mean (β = 1.45). The union of both sets is recomputed.
  (Thresholds second-hand, from PAPERS.md and a re-implementation citing §4.3 and §5.5; whose tail the suffix is —
  each span's, or the prompt's, which the answer is generated from — is not settled there. RelayConfig offers both,
  at the check layer only or summed over all layers; the prompt's tail over all layers is the default, and the
  factors are re-tuned for the embedded pair, see RelayConfig.)
- A fixed-budget variant (`select="top"`): the r·n span tokens of largest influence, ranked across all spans, ∪ the
  deviation rule. A threshold β·mean recomputes a share that swings with how peaked the attention is; a fixed share
  spends the budget the same way CacheBlend does, but ranked by what the answer reads rather than by change.
"""

from __future__ import annotations

import math

import torch


def l2_deviation(v_fresh: torch.Tensor, v_relayed: torch.Tensor) -> torch.Tensor:
    """CacheBlend's deviation. v_*: [n, num_kv_heads, head_dim] -> [n] float32."""
    diff = v_fresh.float() - v_relayed.float()
    return diff.pow(2).flatten(1).sum(-1)


def cosine_deviation(v_fresh: torch.Tensor, v_relayed: torch.Tensor) -> torch.Tensor:
    """RelayCaching's deviation, over the token's whole value vector (all kv heads). [n, H_kv, D] -> [n]."""
    a, b = v_fresh.float().flatten(1), v_relayed.float().flatten(1)
    return (1.0 - torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-8)).clamp_min(0.0)


def influence(q_window: torch.Tensor, keys: torch.Tensor, query_positions: torch.Tensor,
              key_positions: torch.Tensor, scale: float, sliding_window: int = 0) -> torch.Tensor:
    """Mean attention probability each key receives from the window's queries (causal, all heads averaged; keys
    `sliding_window` or more positions behind a query get none from it, as in the model's windowed layers).

    q_window: [w, num_heads, head_dim] rotated queries; keys: [kv_len, num_kv_heads, head_dim] rotated keys;
    query_positions: [w]; key_positions: [kv_len] -> [kv_len] float32.
    """
    num_heads, num_kv_heads = q_window.shape[1], keys.shape[1]
    k = keys.float().repeat_interleave(num_heads // num_kv_heads, dim=1)  # [kv_len, H, D]
    scores = torch.einsum("whd,khd->hwk", q_window.float(), k) * scale  # [H, w, kv_len]
    visible = key_positions[None, :] <= query_positions[:, None]  # [w, kv_len]
    if sliding_window:
        visible &= key_positions[None, :] > query_positions[:, None] - sliding_window
    scores = scores.masked_fill(~visible[None], float("-inf"))
    return scores.softmax(-1).mean(dim=(0, 1))


def top_ratio(deviation: torch.Tensor, ratio: float) -> torch.Tensor:
    """CacheBlend: the ceil(ratio·n) tokens of largest deviation. [n] -> [n] bool."""
    n = deviation.numel()
    keep = min(n, math.ceil(ratio * n - 1e-9))
    chosen = torch.zeros(n, dtype=torch.bool, device=deviation.device)
    if keep > 0:
        chosen[deviation.topk(keep).indices] = True
    return chosen


def above_mean(score: torch.Tensor, factor: float) -> torch.Tensor:
    """RelayCaching's sparse-outlier test: score ≥ factor·mean(score). [n] -> [n] bool."""
    if score.numel() == 0:
        return torch.zeros(0, dtype=torch.bool, device=score.device)
    return score >= factor * score.mean()


def relaycaching_select(deviation: torch.Tensor, influence_score: torch.Tensor, deviation_factor: float,
                        influence_factor: float) -> torch.Tensor:
    """Deviation-based ∪ influence-based selection over one span's tokens. [n], [n] -> [n] bool."""
    return above_mean(deviation, deviation_factor) | above_mean(influence_score, influence_factor)


def top_influence_select(deviation: torch.Tensor, influence_score: torch.Tensor, span_ids: torch.Tensor,
                         ratio: float, deviation_factor: float) -> torch.Tensor:
    """The ceil(ratio·n) tokens of largest influence over all spans (influence is attention from the same queries,
    so it compares across spans) ∪ each span's deviation ≥ factor·mean. [n], [n], [n] span index -> [n] bool."""
    chosen = top_ratio(influence_score, ratio)
    for span in span_ids.unique():
        rows = span_ids == span
        chosen[rows] |= above_mean(deviation[rows], deviation_factor)
    return chosen
