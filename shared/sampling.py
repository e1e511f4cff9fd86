"""Sampling parameters and the one logits processor that both the target and the draft go through.

Speculative sampling is lossless only if the draft distribution q and the target distribution p are processed
identically (temperature, then top-k, then top-p), so `processed_probs` is the single definition of "the
distribution we sample from"; `sample` draws from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from specrelay.shared.errors import SpecrelayError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    seed: int | None = None
    max_tokens: int = 128
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self):
        if self.temperature < 0:
            raise SpecrelayError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise SpecrelayError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise SpecrelayError(f"top_k must be >= 0, got {self.top_k}")
        if self.max_tokens < 0:
            raise SpecrelayError(f"max_tokens must be >= 0, got {self.max_tokens}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def processed_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits: [num_rows, vocab] -> float32 probabilities [num_rows, vocab] after temperature, top-k, top-p.
    Greedy is the one-hot distribution on the argmax, so greedy speculation is the temperature -> 0 limit."""
    logits = logits.float()
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p: drop a token when the mass before it already does
        drop = (sorted_probs.cumsum(-1) - sorted_probs) >= params.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def make_generator(params: SamplingParams, device: str | torch.device = "cpu") -> torch.Generator | None:
    if params.seed is None:
        return None
    return torch.Generator(device=device).manual_seed(params.seed)


def sample(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """probs: [num_rows, vocab] -> token ids [num_rows] (argmax for one-hot rows, i.e. greedy)."""
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
