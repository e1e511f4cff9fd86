"""Sampling parameters and the one logits processor that both the target and the draft go through.

Speculative sampling is lossless only if the draft distribution q and the target distribution p are processed
identically (logit_bias, then temperature, then top-k, then top-p), so `processed_probs` is the single definition
of "the distribution we sample from"; `sample` draws from it. `processed_logprobs` is what a request's logprobs
report: the same processing up to temperature (1 for greedy), before top-k/top-p truncation.

Whatever the logits and parameters, that distribution is finite and sums to 1: a request's settings or a model's
overflow must never reach `torch.multinomial` as NaN (it raises, and one request would take the server down).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from specrelay.shared.errors import SpecrelayError

# Below this temperature sampling is greedy (vLLM's _SAMPLING_EPS). Dividing logits by a temperature near float32's
# smallest normal (~1.2e-38) overflows to inf and softmax turns it into NaN; long before that the distribution is
# one-hot on the argmax in float32 anyway, so the limit itself is what such a request asks for.
GREEDY_BELOW_TEMPERATURE = 1e-5
MAX_TOP_LOGPROBS = 20  # OpenAI's limit on top_logprobs
MAX_LOGIT_BIAS = 100.0  # OpenAI's range for logit_bias values


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # below GREEDY_BELOW_TEMPERATURE (0 included) = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    seed: int | None = None
    max_tokens: int = 128
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    grammar: str | None = None  # llguidance grammar the output must match (shared/grammar.py); None: free text
    logprobs: int | None = None  # None: none; k: each committed token's logprob and its top-k alternatives
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) pairs added to the logits before anything

    def __post_init__(self):
        if not (math.isfinite(self.temperature) and self.temperature >= 0):  # NaN fails every comparison
            raise SpecrelayError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise SpecrelayError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise SpecrelayError(f"top_k must be >= 0, got {self.top_k}")
        if self.max_tokens < 0:
            raise SpecrelayError(f"max_tokens must be >= 0, got {self.max_tokens}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise SpecrelayError(f"logprobs must be in 0..{MAX_TOP_LOGPROBS}, got {self.logprobs}")
        for token_id, bias in self.logit_bias:
            if token_id < 0 or not (math.isfinite(bias) and -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS):
                raise SpecrelayError(f"logit_bias must map token ids >= 0 to biases in [-100, 100], got "
                                     f"{token_id}: {bias}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW_TEMPERATURE


def processed_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits: [num_rows, vocab] -> float32 probabilities [num_rows, vocab] after logit_bias, temperature, top-k,
    top-p. Greedy is the one-hot distribution on the argmax, so greedy speculation is the temperature -> 0 limit. A
    row with no finite distribution left (every logit -inf or NaN) falls back to that one-hot row."""
    logits = finite_logits(biased(logits.float(), params))
    one_hot = torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    if params.greedy:
        return one_hot
    # Shift by the row's max before dividing: every scaled logit is then <= 0 and none can overflow to +inf.
    logits = (logits - logits.amax(-1, keepdim=True)) / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p: drop a token when the mass before it already does
        # (the first token never is, as top_p > 0, so every row keeps some mass)
        drop = (sorted_probs.cumsum(-1) - sorted_probs) >= params.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        probs = probs / probs.sum(-1, keepdim=True)
    usable = torch.isfinite(probs).all(-1, keepdim=True) & (probs.sum(-1, keepdim=True) > 0)
    return torch.where(usable, probs, one_hot)


def processed_logprobs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits: [num_rows, vocab] -> float32 log-probabilities [num_rows, vocab]: log-softmax after logit_bias and
    temperature (1 for greedy), before top-k/top-p (vLLM's `processed_logprobs`). A row with nothing finite is the
    log of processed_probs' one-hot fallback."""
    logits = finite_logits(biased(logits.float(), params))
    if not params.greedy:
        logits = logits / params.temperature
    logprobs = torch.log_softmax(logits, dim=-1)
    usable = torch.isfinite(logprobs).any(-1, keepdim=True)
    fallback = torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float().log()
    return torch.where(usable, logprobs, fallback)


def biased(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """[num_rows, vocab] -> the same with the request's logit_bias added (a token id beyond this model's vocabulary,
    a draft model's smaller one, has no column to bias)."""
    pairs = [(tok, bias) for tok, bias in params.logit_bias if tok < logits.shape[-1]]
    if not pairs:
        return logits
    ids = torch.tensor([tok for tok, _ in pairs], device=logits.device)
    bias = torch.tensor([b for _, b in pairs], dtype=logits.dtype, device=logits.device)
    return logits.index_add(-1, ids, bias.expand(*logits.shape[:-1], len(pairs)))


def finite_logits(logits: torch.Tensor) -> torch.Tensor:
    """[num_rows, vocab] float -> the same with NaN as -inf (a NaN says nothing for its token: it gets no mass),
    and in a row holding +inf, those tokens at 0 and all others at -inf: the limit of logits growing without
    bound, where the +inf tokens share all the mass."""
    logits = logits.nan_to_num(nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    at_inf = logits == float("inf")  # no early return on "none": that would cost a device sync per call
    limit = torch.where(at_inf, 0.0, float("-inf"))
    return torch.where(at_inf.any(-1, keepdim=True), limit, logits)


def make_generator(params: SamplingParams, device: str | torch.device = "cpu") -> torch.Generator | None:
    if params.seed is None:
        return None
    return torch.Generator(device=device).manual_seed(params.seed)


def sample(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """probs: [num_rows, vocab] -> token ids [num_rows] (argmax for one-hot rows, i.e. greedy)."""
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
