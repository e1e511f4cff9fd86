"""Held requests: a finished request's KV kept for a while so that the same request can go on — a server-side tool
round appends the tool's answer and decodes on with no second prefill of the conversation.

The protocol (shared/messages.py), for every sender (the gateway's tool rounds; client-side retention):

- `Generate(hold_s=H)`: when the request ends by a stop token, the verifier keeps its block table for up to H
  seconds instead of freeing it. Its last `TokenChunk` carries `holder`, the verifier's consumer name.
- `Continue(request_id, token_ids, sampling, reply_to, hold_s, tool_response_tokens)` on `continue_stream(holder)`:
  the verifier drops the stop token the model sampled (it was never fed), appends `token_ids`, prefills only them on
  the held table (`SpecEngine.extend`) and streams the new turn's tokens as usual (offsets from 0 for the turn).
  `hold_s` holds it again after this turn. The last chunk's usage covers every turn of the request so far.
- `Cancel(request_id)`: releases a held request now. Released or expired, a held request's KV goes where any
  finished request's goes (the prefix cache when on, so a fresh request for the same conversation still finds it
  by prefix); a `Continue` that comes too late gets an error chunk ("... is not held here ...") and the sender
  sends a fresh `Generate` of the whole conversation instead (with `evicted_tokens`, so PTE books it as recompute).

A held table is memory the scheduler cannot use: the sender should release what it will not continue. A replica
that stops frees what it holds, answers the Continues it has received with an error and deletes its
`continue_stream`; the verifier service's side of all this is in continues.py.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import msgspec

from specrelay.shared.messages import PteParts, RelayUsage, Usage
from specrelay.shared.pte import PteAccount, PteProfile, TurnTokens


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

    def add_turn(self, req, carried_tokens: int = 0, relay: RelayUsage | None = None, evicted_tokens: int = 0,
                 tool_response_tokens: int = 0) -> Usage:
        """`req`: the engine's finished request for this turn; `carried_tokens`: the context a held table brought
        (0 on the first turn). Returns the cumulative usage."""
        u, s = self.usage, req.stats
        self.turns += 1
        context = len(req.prompt)
        prefix_hit = max(s.cached_tokens - carried_tokens, 0)
        u.prompt_tokens += context - carried_tokens
        u.completion_tokens += len(req.output)
        u.cached_tokens += prefix_hit
        u.spec_steps += s.steps
        u.accepted_tokens += s.accepted_tokens
        u.drafted_tokens += s.drafted_tokens
        if relay is not None:
            u.relay = relay
        if self.account is None:
            return msgspec.structs.replace(u)
        reused = s.cached_tokens + (relay.reused_tokens if relay else 0)
        # Tokens whose KV had existed (dropped after a hold expired; picked for relay recomputation) but were
        # prefilled again: the `recompute` part. A prefix-cache hit on them made them cached, not recomputed.
        recomputed = (relay.recomputed_tokens if relay else 0) + max(evicted_tokens - reused, 0)
        recomputed = min(recomputed, context - reused)
        self.account.add(TurnTokens(prefilled_tokens=context - reused - recomputed, decode_tokens=len(req.output),
                                    cached_tokens=reused, recomputed_tokens=recomputed,
                                    tool_response_tokens=tool_response_tokens))
        p = self.account.usage
        u.pte = PteParts(total=p.total, prefill=p.prefill, decode=p.decode, recompute=p.recompute,
                         tool_response_tokens=p.tool_response_tokens, full_eviction_total=p.full_eviction_total,
                         gamma=p.gamma, beta=self.profile.beta, source=self.source, turns=self.turns)
        return msgspec.structs.replace(u)  # a copy: the next turn must not change a chunk already sent


@dataclass
class Held:
    req: object  # the engine's finished Request; its table still holds the KV
    ledger: Ledger
    expires_s: float  # time.monotonic()


class HeldRequests:
    """The verifier's held requests by the sender's request id; plain Python, the service frees what expires."""

    def __init__(self) -> None:
        self._held: dict[str, Held] = {}

    def __len__(self) -> int:
        return len(self._held)

    def hold(self, request_id: str, req, ledger: Ledger, hold_s: float) -> None:
        self._held[request_id] = Held(req, ledger, time.monotonic() + hold_s)

    def get(self, request_id: str) -> Held | None:
        return self._held.get(request_id)

    def take(self, request_id: str) -> Held | None:
        """The held request, removed (a Continue resumes it, a Cancel releases it); None if not held here."""
        return self._held.pop(request_id, None)

    def expired(self, now_s: float | None = None) -> list[Held]:
        now_s = time.monotonic() if now_s is None else now_s
        gone = [rid for rid, h in self._held.items() if h.expires_s <= now_s]
        return [self._held.pop(rid) for rid in gone]

    def take_all(self) -> list[Held]:
        """Every held request, removed (the replica is stopping)."""
        held, self._held = list(self._held.values()), {}
        return held

    def num_blocks(self) -> int:
        return sum(len(h.req.table.blocks) for h in self._held.values())

    def next_expiry_s(self) -> float | None:
        return min((h.expires_s for h in self._held.values()), default=None)
