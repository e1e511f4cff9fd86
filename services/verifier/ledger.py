"""One request's usage across its turns, as the last TokenChunk of each turn reports it (OpenAI fields, and PTE:
shared/pte.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import msgspec

from specrelay.shared.messages import ProposerUsage, PteParts, RelayUsage, Usage
from specrelay.shared.pte import PteAccount, PteProfile, TurnTokens

if TYPE_CHECKING:
    from specrelay.services.verifier.handoffs import RequestOutput


@dataclass
class Ledger:
    """One request's usage across its turns (the first prefill and every Continue). OpenAI fields add up:
    prompt_tokens counts each token fed once (the prompt, then each continuation), completion_tokens every token
    generated, cached_tokens what the prefix cache supplied. PTE: one `TurnTokens` per turn (shared/pte.py)."""

    profile: PteProfile | None = None
    source: str = ""
    usage: Usage = field(default_factory=Usage)
    account: PteAccount | None = None
    turns: int = 0

    def __post_init__(self) -> None:
        if self.profile is not None:
            self.account = PteAccount(self.profile)

    def add_turn(self, turn: RequestOutput, cached_tokens: int, carried_tokens: int = 0,
                 relay: RelayUsage | None = None, evicted_tokens: int = 0, tool_response_tokens: int = 0) -> Usage:
        """`turn`: what the engine reported of the finished turn; `cached_tokens`: context tokens whose KV was
        there already (a held table's, the prefix cache's); `carried_tokens`: of those, what a held table brought
        (0 on the first turn). Returns the cumulative usage."""
        u, s = self.usage, turn.stats
        self.turns += 1
        context = turn.num_prompt_tokens
        prefix_hit = max(cached_tokens - carried_tokens, 0)
        u.prompt_tokens += context - carried_tokens
        u.completion_tokens += len(turn.output)
        u.cached_tokens += prefix_hit
        u.spec_steps += s.steps
        u.accepted_tokens += s.accepted_tokens
        u.drafted_tokens += s.drafted_tokens
        for name, (accepted, drafted) in s.by_proposer.items():
            mine = (u.proposers if u.proposers is not None else {}).get(name) or ProposerUsage()
            u.proposers = {**(u.proposers or {}), name: ProposerUsage(mine.accepted_tokens + accepted,
                                                                       mine.drafted_tokens + drafted)}
        if relay is not None:
            u.relay = relay
        if self.account is None:
            return msgspec.structs.replace(u)
        reused = cached_tokens + (relay.reused_tokens if relay else 0)
        # Tokens whose KV had existed (dropped after a hold expired; picked for relay recomputation) but were
        # prefilled again: the `recompute` part. A prefix-cache hit on them made them cached, not recomputed.
        recomputed = (relay.recomputed_tokens if relay else 0) + max(evicted_tokens - reused, 0)
        recomputed = min(recomputed, context - reused)
        self.account.add(TurnTokens(prefilled_tokens=context - reused - recomputed, decode_tokens=len(turn.output),
                                    cached_tokens=reused, recomputed_tokens=recomputed,
                                    tool_response_tokens=tool_response_tokens))
        p = self.account.usage
        u.pte = PteParts(total=p.total, prefill=p.prefill, decode=p.decode, recompute=p.recompute,
                         tool_response_tokens=p.tool_response_tokens, full_eviction_total=p.full_eviction_total,
                         gamma=p.gamma, beta=self.profile.beta, source=self.source, turns=self.turns)
        return msgspec.structs.replace(u)  # a copy: the next turn must not change a chunk already sent
