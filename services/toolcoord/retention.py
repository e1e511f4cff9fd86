"""Keep, offload or drop the KV of a conversation paused on a client-side tool call.

Anchor — InferCept (Abhyankar et al., "InferCept: Efficient Intercept Support for Augmented LLM Inference",
ICML 2024) picks per paused request the option that wastes the least GPU memory × time, in token·seconds
(per-token memory factored out; our reading of its waste equations):

    discard:  T_fwd(C) · (C + C_batch)     recomputing C tokens later stalls them and the running batch
    preserve: T_pause · C                  C tokens held idle through the pause
    swap:     2 · T_swap(C) · C_batch      copying out and back in stalls the batch

Memory held while nobody needs it is not a loss, though, and InferCept's preserve waste charges it anyway. The PTE
policy prices every option in prefill token equivalents (shared/pte.py), with memory charged at its
opportunity cost under the current pressure. With p the prefill seconds per token, s the KV bytes per token, B the
device KV budget, U the bytes the other requests hold, C the context, T the expected (remaining) pause:

    drop:     C − C_shared                  the context is prefilled again on resume (a prefix shared with other
                                            requests is found in the kvstore anyway)
    keep:     T · (C·s / B) · u / p,        u = (U + C·s) / B: the server turns its whole KV budget into at most
                                            1/p PTE per second, so C·s bytes held for T seconds displace that
                                            share of it, scaled by how full the budget is (empty memory
                                            displaces nothing); infeasible past the budget
    offload:  C·s · (σ / bw_out + 1 / bw_in) / p
                                            device time spent copying out (σ: the share not hidden behind
                                            compute) and back in, in prefill tokens; infeasible when the kvstore
                                            lacks room

Keep also has a staged form — hold until a horizon h chosen on the tool's observed pauses, then evict if still
paused — priced in `decide`; it is what makes a tool that is usually quick but sometimes waits minutes
cheap (keep through the quick ones, evict the rare long ones at h). The cheapest feasible option wins (ties:
keep, then offload). Keep-through and drop are both linear in C, so their break-even pause T* = p·B / (s·u) does
not depend on the context length: seconds for an 8B model on a full GPU, minutes on an idle one. A kept
conversation is decided again after `recheck_after_s`, with the expected *remaining* pause; under memory
pressure `choose_evictions` frees bytes from the kept conversations whose eviction costs least per byte.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Sequence

from specrelay.services.toolcoord.pauses import PauseEstimator
from specrelay.shared.errors import ConfigError
from specrelay.shared.pte import PteProfile


class Retention(str, Enum):
    KEEP = "keep"
    OFFLOAD = "offload"
    DROP = "drop"


@dataclass(frozen=True)
class RetentionConfig:
    kv_budget_bytes: int  # device memory for KV, all requests together
    kv_bytes_per_token: int  # K and V of one token over all layers
    offload_bytes_per_s: float = 10e9  # device → kvstore
    reload_bytes_per_s: float = 10e9  # kvstore → device
    offload_stall_fraction: float = 1.0  # σ: share of the copy-out on the critical path (0: fully overlapped)
    recheck_quantile: float = 0.9
    offload_enabled: bool = True

    def __post_init__(self) -> None:
        if self.kv_budget_bytes <= 0 or self.kv_bytes_per_token <= 0:
            raise ConfigError("retention: kv_budget_bytes and kv_bytes_per_token must be positive")
        if self.offload_bytes_per_s <= 0 or self.reload_bytes_per_s <= 0:
            raise ConfigError("retention: offload and reload bandwidths must be positive")
        if not 0.0 <= self.offload_stall_fraction <= 1.0 or not 0.0 < self.recheck_quantile <= 1.0:
            raise ConfigError("retention: offload_stall_fraction must be in [0, 1], recheck_quantile in (0, 1]")


@dataclass(frozen=True)
class PausedConversation:
    conversation_id: str
    context_tokens: int  # C: tokens whose KV the conversation holds
    tool_names: tuple[str, ...]  # the calls the client is running
    elapsed_s: float = 0.0  # how long it has been paused so far (0 at the first decision)
    shared_prefix_tokens: int = 0  # of C, a prefix other requests share: cached in the kvstore whatever we do


@dataclass(frozen=True)
class MemoryState:
    used_bytes: int  # U: device KV held by everything except this conversation
    kvstore_free_bytes: float = math.inf  # room left in the offload tier


@dataclass(frozen=True)
class RetentionDecision:
    conversation_id: str
    action: Retention
    costs: dict[str, float]  # each option's expected cost (PTE; token·seconds for InferCept); inf: infeasible
    expected_pause_s: float
    recheck_after_s: float | None  # kept: decide again after this long if still paused


class RetentionPolicy:
    """The PTE policy. One per verifier; `observe_pause` when a paused conversation comes back."""

    def __init__(self, profile: PteProfile, config: RetentionConfig, pauses: PauseEstimator | None = None) -> None:
        self.profile = profile
        self.config = config
        self.pauses = pauses or PauseEstimator()

    def observe_pause(self, tool_names: Sequence[str], seconds: float) -> None:
        self.pauses.observe(tool_names, seconds)

    def costs(self, conv: PausedConversation, memory: MemoryState, pause_s: float) -> dict[str, float]:
        cfg, p = self.config, self.profile.prefill_s_per_token
        kv_bytes = conv.context_tokens * cfg.kv_bytes_per_token
        drop = float(max(0, conv.context_tokens - conv.shared_prefix_tokens))
        if memory.used_bytes + kv_bytes > cfg.kv_budget_bytes:
            keep = math.inf
        else:
            pressure = (memory.used_bytes + kv_bytes) / cfg.kv_budget_bytes
            keep = pause_s * (kv_bytes / cfg.kv_budget_bytes) * pressure / p
        if not cfg.offload_enabled or kv_bytes > memory.kvstore_free_bytes:
            offload = math.inf
        else:
            copy_s = kv_bytes * (cfg.offload_stall_fraction / cfg.offload_bytes_per_s + 1 / cfg.reload_bytes_per_s)
            offload = copy_s / p
        return {Retention.KEEP.value: keep, Retention.OFFLOAD.value: offload, Retention.DROP.value: drop}

    def decide(self, conv: PausedConversation, memory: MemoryState) -> RetentionDecision:
        pause_s = self.pauses.expected_remaining_s(conv.tool_names, conv.elapsed_s)
        costs = self.costs(conv, memory, pause_s)
        keep_through = costs[Retention.KEEP.value]
        # Staged keep: hold until a horizon h, then evict if still paused (pauses.PauseStats.staged_keep); keep
        # is linear in the time held, so its rate is keep_through / E[T − t | T > t].
        staged, horizon = math.inf, None
        if math.isfinite(keep_through) and pause_s > 0:
            evict = min(costs[Retention.OFFLOAD.value], costs[Retention.DROP.value])
            plan = self.pauses.staged_keep(conv.tool_names, conv.elapsed_s, keep_through / pause_s, evict)
            if plan is not None:
                horizon, staged = plan
        costs[Retention.KEEP.value] = min(keep_through, staged)
        # min() keeps the first of equal costs: keep, then offload, then drop.
        action = Retention(min(costs, key=costs.__getitem__))
        recheck = None
        if action is Retention.KEEP:
            if staged < keep_through and horizon is not None:
                recheck = horizon - conv.elapsed_s
            else:
                tail_s = self.pauses.quantile_s(conv.tool_names, self.config.recheck_quantile)
                # Past the quantile the pause is in its tail: look again after as long as it has lasted.
                recheck = tail_s - conv.elapsed_s if tail_s > conv.elapsed_s else max(conv.elapsed_s, 1.0)
        return RetentionDecision(conv.conversation_id, action, costs, pause_s, recheck)

    def choose_evictions(self, kept: Sequence[PausedConversation], memory: MemoryState,
                         bytes_needed: int) -> list[RetentionDecision]:
        """Kept conversations to offload or drop so that `bytes_needed` more device bytes are free: the ones
        whose eviction costs least per byte freed (eviction cost = the cheaper of offload and drop, less the
        keep cost it saves)."""
        ranked = []
        for conv in kept:
            pause_s = self.pauses.expected_remaining_s(conv.tool_names, conv.elapsed_s)
            costs = self.costs(conv, memory, pause_s)
            evict = min((Retention.OFFLOAD, Retention.DROP), key=lambda r: costs[r.value])
            keep = costs[Retention.KEEP.value]
            regret = costs[evict.value] - (keep if math.isfinite(keep) else 0.0)
            freed = conv.context_tokens * self.config.kv_bytes_per_token
            ranked.append((regret / max(freed, 1), conv, evict, costs, pause_s, freed))
        ranked.sort(key=lambda item: item[0])
        chosen, freed_total = [], 0
        for _, conv, evict, costs, pause_s, freed in ranked:
            if freed_total >= bytes_needed:
                break
            chosen.append(RetentionDecision(conv.conversation_id, evict, costs, pause_s, None))
            freed_total += freed
        return chosen


class FixedPolicy:
    """The benchmark baselines: always drop (recompute on resume, what a stateless server does) or always keep
    (whatever the memory: its peak KV shows what that costs)."""

    def __init__(self, action: Retention) -> None:
        self.action = action

    def observe_pause(self, tool_names: Sequence[str], seconds: float) -> None:
        pass  # a fixed choice learns nothing

    def decide(self, conv: PausedConversation, memory: MemoryState) -> RetentionDecision:
        return RetentionDecision(conv.conversation_id, self.action, {}, math.nan, None)


class InferCeptPolicy:
    """The anchor: InferCept's min-waste choice (module docstring), with the same inputs as the PTE policy —
    recompute and swap times from the profile and bandwidths, the pause from the same learned estimates. Its
    waste is memory × time in token·seconds; swap takes the place of our offload."""

    def __init__(self, profile: PteProfile, config: RetentionConfig, pauses: PauseEstimator | None = None) -> None:
        self.profile = profile
        self.config = config
        self.pauses = pauses or PauseEstimator()

    def observe_pause(self, tool_names: Sequence[str], seconds: float) -> None:
        self.pauses.observe(tool_names, seconds)

    def waste(self, conv: PausedConversation, memory: MemoryState, pause_s: float) -> dict[str, float]:
        cfg = self.config
        c = conv.context_tokens
        batch_tokens = memory.used_bytes / cfg.kv_bytes_per_token
        fwd_s = c * self.profile.prefill_s_per_token
        swap_s = c * cfg.kv_bytes_per_token / min(cfg.offload_bytes_per_s, cfg.reload_bytes_per_s)
        swap = 2 * swap_s * batch_tokens
        if not cfg.offload_enabled or c * cfg.kv_bytes_per_token > memory.kvstore_free_bytes:
            swap = math.inf
        preserve = pause_s * c
        if memory.used_bytes + c * cfg.kv_bytes_per_token > cfg.kv_budget_bytes:
            preserve = math.inf
        return {Retention.KEEP.value: preserve, Retention.OFFLOAD.value: swap,
                Retention.DROP.value: fwd_s * (c + batch_tokens)}

    def decide(self, conv: PausedConversation, memory: MemoryState) -> RetentionDecision:
        pause_s = self.pauses.expected_remaining_s(conv.tool_names, conv.elapsed_s)
        waste = self.waste(conv, memory, pause_s)
        action = Retention(min(waste, key=waste.__getitem__))
        return RetentionDecision(conv.conversation_id, action, waste, pause_s, None)
