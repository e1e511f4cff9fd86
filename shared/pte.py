"""PTE (prefill token equivalents): the cost of a tool-integrated trajectory in units of prefill tokens.

"Beyond Accuracy: Unveiling Inefficiency Patterns in Tool-Integrated Reasoning" (arXiv 2604.05404):

    PTE = Σ_i ( D_prefill_i + γ · L_seq_i · D_decode_i )

for turns i; D_prefill_i the tokens prefilled in turn i, L_seq_i the context length when turn i starts decoding
(held constant within the turn, as in the paper), D_decode_i the tokens generated in turn i. γ converts one decode
step's read of one context token into prefill tokens. The paper assumes each tool pause evicts the KV cache, so its
D_prefill_i is the whole context of turn i. specrelay counts what it really computes:

    prefill   = tokens entering the context for the first time (user text, tool responses) that were prefilled
    recompute = tokens whose KV existed but had to be prefilled again (dropped across a pause, evicted)
    decode    = Σ_i D_decode_i · (β + γ · L_seq_i)
    total     = prefill + recompute + decode;   full_eviction_total = Σ_i (L_seq_i + D_decode_i · (β + γ · L_seq_i))

β, a per-decode-step constant (reading the weights once per step), is not in the paper's formula: it is 0 for the
analytic γ and the fitted a/p for a calibrated profile (below). With β = 0 and every context token prefilled each
turn, `full_eviction_total` is exactly the paper's PTE.

γ two ways:
  * analytic (paper): prefill ≈ 2·N_params FLOPs per token; a decode step reads the KV of each context token,
    4·n_layers·d_model·(H_kv/H_q) bytes in fp16, worth HOI = peak FLOP/s ÷ peak bytes/s FLOPs each, so
        γ = 4·n_layers·d_model·(H_kv/H_q)·HOI / (2·N_params) = 2·n_layers·d_model·(H_kv/H_q)·HOI / N_params.
    The paper's H100 HOI is the sparsity peak, 1,513 TFLOP/s ÷ 2.0 TB/s ≈ 756 FLOP/B.
  * measured (specrelay's definition): prefill costs p seconds per token (slope of prefill time against prompt
    length); a decode step at context length L costs step(L) = a + b·L seconds (least squares). In prefill tokens a
    step costs step(L)/p = a/p + (b/p)·L, hence γ = b/p and β = a/p.

Plain Python on purpose: schedulers and the tool coordinator import this without torch.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

from specrelay.shared.errors import ConfigError

# 1,513 TFLOP/s (FP16 with sparsity) ÷ 2.0 TB/s: the H100 operational intensity the paper's γ examples use.
H100_PAPER_HOI_FLOP_PER_BYTE = 1513e12 / 2.0e12


def analytic_gamma(n_layers: int, d_model: int, num_kv_heads: int, num_q_heads: int, num_params: float,
                   hoi_flop_per_byte: float = H100_PAPER_HOI_FLOP_PER_BYTE) -> float:
    """γ = 2·n_layers·d_model·(H_kv/H_q)·HOI / N_params (the paper's hardware-aware γ)."""
    if min(n_layers, d_model, num_kv_heads, num_q_heads) <= 0 or num_params <= 0 or hoi_flop_per_byte <= 0:
        raise ConfigError("analytic_gamma: every model and device figure must be positive")
    return 2.0 * n_layers * d_model * (num_kv_heads / num_q_heads) * hoi_flop_per_byte / num_params


def fit_line(points: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares (intercept, slope) of y against x over (x, y) points."""
    if len(points) < 2:
        raise ConfigError(f"need at least 2 measured points to fit a line, got {len(points)}")
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    sxx = sum((x - mean_x) ** 2 for x, _ in points)
    if sxx == 0:
        raise ConfigError("the measured points all share one x value: vary the token counts")
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / sxx
    return mean_y - slope * mean_x, slope


@dataclass(frozen=True)
class PteProfile:
    """What `specrelay calibrate` writes and the server loads: γ, β and the timings they came from."""

    gamma: float  # decode cost of one context token per step, in prefill tokens
    prefill_s_per_token: float  # p: converts PTE to seconds on this device
    decode_a_s: float = 0.0  # a: the context-independent part of one decode step
    decode_b_s_per_ctx_token: float = 0.0  # b: the growth of a decode step per context token
    device: str = "unknown"
    model: str = "unknown"

    def __post_init__(self) -> None:
        if not (self.gamma >= 0 and math.isfinite(self.gamma)):
            raise ConfigError(f"PTE profile: gamma must be a finite number >= 0, got {self.gamma}")
        if not (self.prefill_s_per_token > 0 and math.isfinite(self.prefill_s_per_token)):
            raise ConfigError(f"PTE profile: prefill_s_per_token must be > 0, got {self.prefill_s_per_token}")
        if self.decode_a_s < 0 or self.decode_b_s_per_ctx_token < 0:
            raise ConfigError("PTE profile: decode_a_s and decode_b_s_per_ctx_token must be >= 0")

    @property
    def beta(self) -> float:
        """Per-decode-step constant in prefill tokens (a/p); 0 when only γ is known."""
        return self.decode_a_s / self.prefill_s_per_token

    @classmethod
    def fit(cls, prefill_points: Sequence[tuple[int, float]], decode_points: Sequence[tuple[int, float]],
            device: str = "unknown", model: str = "unknown") -> "PteProfile":
        """Fit from measurements: prefill_points (prompt tokens, seconds), decode_points (context length,
        seconds per decode step). γ = b/p, β = a/p (module docstring)."""
        _, p = fit_line(prefill_points)
        a, b = fit_line(decode_points)
        if p <= 0:
            raise ConfigError(f"fitted prefill cost per token is {p:.3g} s: measure longer prompts")
        # A slightly negative fit is measurement noise on a flat curve; the cost model wants a, b >= 0.
        a, b = max(a, 0.0), max(b, 0.0)
        return cls(gamma=b / p, prefill_s_per_token=p, decode_a_s=a, decode_b_s_per_ctx_token=b,
                   device=device, model=model)

    @classmethod
    def analytic(cls, gamma: float, num_params: float, peak_flops: float, device: str = "unknown",
                 model: str = "unknown") -> "PteProfile":
        """A profile without measurements: p = 2·N_params / peak FLOP/s, β = 0 (the paper's model)."""
        return cls(gamma=gamma, prefill_s_per_token=2.0 * num_params / peak_flops, device=device, model=model)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "PteProfile":
        try:
            raw = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot read PTE profile {path}: {e}") from e
        if not isinstance(raw, dict) or "gamma" not in raw or "prefill_s_per_token" not in raw:
            raise ConfigError(f"PTE profile {path}: expected a JSON object with gamma and prefill_s_per_token")
        known = {f for f in cls.__dataclass_fields__}
        try:
            return cls(**{k: v for k, v in raw.items() if k in known})
        except TypeError as e:
            raise ConfigError(f"PTE profile {path}: {e}") from e

    # --- costs in PTE -------------------------------------------------------------------------------------------
    def decode_step_pte(self, context_tokens: int) -> float:
        """One decode step at this context length, in prefill tokens: β + γ·L."""
        return self.beta + self.gamma * context_tokens

    def seconds(self, pte: float) -> float:
        return pte * self.prefill_s_per_token

    def pte(self, seconds: float) -> float:
        return seconds / self.prefill_s_per_token


def measure_profile(prefill_s: Callable[[int], float], decode_step_s: Callable[[int], float],
                    prompt_lengths: Sequence[int], context_lengths: Sequence[int], repeats: int = 3,
                    device: str = "unknown", model: str = "unknown") -> PteProfile:
    """Fit a profile from timing callables (the caller runs the model and synchronises the device):
    `prefill_s(n)` the seconds to prefill an n-token prompt, `decode_step_s(L)` the seconds of one decode step at
    context length L. Each point is the median of `repeats` runs, which shrugs off a stray slow run."""
    if repeats < 1:
        raise ConfigError("repeats must be at least 1")
    prefill = [(n, statistics.median(prefill_s(n) for _ in range(repeats))) for n in prompt_lengths]
    decode = [(L, statistics.median(decode_step_s(L) for _ in range(repeats))) for L in context_lengths]
    return PteProfile.fit(prefill, decode, device=device, model=model)


@dataclass(frozen=True)
class TurnTokens:
    """One turn of a trajectory, as the verifier saw it. The context when decoding starts is
    cached + recomputed + prefilled tokens."""

    prefilled_tokens: int  # new to the context this turn (prompt text, tool responses): nothing could hold them
    decode_tokens: int  # generated this turn
    cached_tokens: int = 0  # context tokens whose KV was reused (kept across the pause, prefix hit, relay)
    recomputed_tokens: int = 0  # context tokens whose KV had existed but was dropped, so they were prefilled again
    tool_response_tokens: int = 0  # of prefilled_tokens, those that came from tool responses (reported only)

    @property
    def context_tokens(self) -> int:
        return self.cached_tokens + self.recomputed_tokens + self.prefilled_tokens


@dataclass
class PteUsage:
    """`usage.pte` of a response: specrelay's PTE with its parts, and the paper's full-eviction figure."""

    total: float = 0.0
    prefill: float = 0.0
    decode: float = 0.0
    recompute: float = 0.0
    tool_response_tokens: int = 0
    full_eviction_total: float = 0.0
    gamma: float = 0.0

    def to_dict(self) -> dict[str, float | int]:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def turn_pte(profile: PteProfile, turn: TurnTokens) -> PteUsage:
    """PTE of one turn: prefill + recompute + D_decode·(β + γ·L_seq) (module docstring)."""
    context = turn.context_tokens
    decode = turn.decode_tokens * profile.decode_step_pte(context)
    prefill = float(turn.prefilled_tokens)
    recompute = float(turn.recomputed_tokens)
    return PteUsage(total=prefill + recompute + decode, prefill=prefill, decode=decode, recompute=recompute,
                    tool_response_tokens=turn.tool_response_tokens, full_eviction_total=context + decode,
                    gamma=profile.gamma)


@dataclass
class PteAccount:
    """Running PTE of one request or trajectory: add turns as they finish, read `usage` at any time."""

    profile: PteProfile
    usage: PteUsage = field(init=False)

    def __post_init__(self) -> None:
        self.usage = PteUsage(gamma=self.profile.gamma)

    def add(self, turn: TurnTokens) -> PteUsage:
        step = turn_pte(self.profile, turn)
        u = self.usage
        u.total += step.total
        u.prefill += step.prefill
        u.decode += step.decode
        u.recompute += step.recompute
        u.tool_response_tokens += step.tool_response_tokens
        u.full_eviction_total += step.full_eviction_total
        return step


def trajectory_pte(profile: PteProfile, turns: Iterable[TurnTokens]) -> PteUsage:
    account = PteAccount(profile)
    for turn in turns:
        account.add(turn)
    return account.usage
