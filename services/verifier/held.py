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
`continue_stream`; the verifier's side of all this is in scheduler.py (what is held, resumed, released) and
service.py (the replies and the kvstore).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass
class Held:
    kv: Any  # the engine's finished request; its table still holds the KV
    ledger: Any  # usage over the turns so far (ledger.py), carried on by the Continue
    expires_s: float  # on the HeldRequests clock (time.monotonic)
    num_tokens: int  # prompt + output: what a Continue appends to
    num_blocks: int  # of KV held


class HeldRequests:
    """The verifier's held requests by the sender's request id; plain Python, the scheduler releases what expires."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._held: dict[str, Held] = {}

    def __len__(self) -> int:
        return len(self._held)

    def hold(self, request_id: str, kv: Any, ledger: Any, hold_s: float, num_tokens: int, num_blocks: int) -> None:
        self._held[request_id] = Held(kv, ledger, self.clock() + hold_s, num_tokens, num_blocks)

    def get(self, request_id: str) -> Held | None:
        return self._held.get(request_id)

    def take(self, request_id: str) -> Held | None:
        """The held request, removed (a Continue resumes it, a Cancel releases it); None if not held here."""
        return self._held.pop(request_id, None)

    def expired(self) -> list[Held]:
        now_s = self.clock()
        gone = [rid for rid, h in self._held.items() if h.expires_s <= now_s]
        return [self._held.pop(rid) for rid in gone]

    def take_all(self) -> list[Held]:
        """Every held request, removed (the replica is stopping)."""
        held, self._held = list(self._held.values()), {}
        return held

    def num_blocks(self) -> int:
        return sum(h.num_blocks for h in self._held.values())
