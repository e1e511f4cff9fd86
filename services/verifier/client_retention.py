"""Client-side tool pauses in the verifier: what becomes of a turn's KV while the client runs its tools.

A chat turn that ends with calls to the client's own tools (OpenAI `finish_reason: "tool_calls"`) is followed,
seconds or minutes later, by the conversation's next request: the whole conversation again, the tool answers
appended. The gateway holds such turns (`Generate.hold_s`) and, once it has parsed the calls, releases the hold
with the tools' names (`Cancel(request_id, tool_names=[...])`). toolcoord's `RetentionPolicy` then prices the three
choices in PTE (services/toolcoord/retention.py) and the verifier acts:

  keep     the block table stays resident; the next request finds it by prefix — the longest common prefix of the
           kept tokens and its prompt (at least one block) is adopted, the rest prefilled — and reports those
           tokens as cached
  offload  the blocks go to the kvstore (PrefixCache.save) and are freed; the next request loads them back
  drop     the blocks are freed unpublished; the next request prefills the conversation again

A kept conversation is decided again at `recheck_after_s` (a pause in its tail is moved out), and kept
conversations are evicted, cheapest per byte first, when an admission needs their blocks. The pause — from the
release to the next request sharing the conversation's prefix — is observed per tool name whatever the choice was,
so the expected pause the policy prices is learned from this server's own clients.

Plain bookkeeping: the verifier service does the saving and freeing; only `truncate` touches the cache, and that
is block accounting.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

from specrelay.services.toolcoord.retention import (
    MemoryState,
    PausedConversation,
    Retention,
    RetentionConfig,
    RetentionPolicy,
)
from specrelay.shared.modeling.kv_cache import BlockTable, PagedKVCache
from specrelay.shared.pte import PteProfile

MAX_TRACKED_PAUSES = 1024  # paused conversations remembered for learning their pause (kept or not)


@dataclass
class Paused:
    key: str  # the request id of the turn that paused
    tokens: list[int]  # the conversation so far (prompt + output), for matching the next request
    prompt_len: int  # the paused turn's prompt: the next request of the same conversation repeats all of it
    tool_names: tuple[str, ...]
    paused_at: float
    req: object | None = None  # kept: the engine's finished request, whose table holds the KV
    recheck_at: float | None = None

    @property
    def kv_tokens(self) -> int:
        return self.req.table.num_tokens if self.req is not None else 0


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix; slice comparisons run in C, bisection keeps them O(n log n)."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


class ClientRetention:
    def __init__(self, policy: RetentionPolicy, cache: PagedKVCache, clock: Callable[[], float] = time.monotonic):
        self.policy, self.cache, self.clock = policy, cache, clock
        self.paused: OrderedDict[str, Paused] = OrderedDict()

    @classmethod
    def for_cache(cls, cache: PagedKVCache, profile: PteProfile, offload: bool,
                  store_bytes_per_s: float = 2e9) -> "ClientRetention":
        """The policy over this cache's whole size as the budget; offload priced at the store's bandwidth."""
        bpb = cache.bytes_per_block()
        config = RetentionConfig(kv_budget_bytes=cache.allocator.num_blocks * bpb,
                                 kv_bytes_per_token=max(1, bpb // cache.block_size),
                                 offload_bytes_per_s=store_bytes_per_s, reload_bytes_per_s=store_bytes_per_s,
                                 offload_enabled=offload)
        return cls(RetentionPolicy(profile, config), cache)

    @property
    def kept(self) -> list[Paused]:
        return [p for p in self.paused.values() if p.req is not None]

    def num_blocks(self) -> int:
        """Blocks of the conversations kept resident."""
        return sum(len(p.req.table.blocks) for p in self.kept)

    def pause(self, key: str, req, tool_names: tuple[str, ...]) -> Retention:
        """A held turn ended with client tool calls: decide now. KEEP: the table stays here (do not free it);
        OFFLOAD / DROP: the caller publishes and/or frees it."""
        p = Paused(key, list(req.tokens), len(req.prompt), tuple(tool_names), self.clock(), req)
        self.paused.pop(key, None)
        decision = self.policy.decide(self._conversation(p), self._memory(p))
        if decision.action is Retention.KEEP:
            if decision.recheck_after_s is not None:
                p.recheck_at = p.paused_at + decision.recheck_after_s
        else:
            p.req = None
        self.paused[key] = p
        while len(self.paused) > MAX_TRACKED_PAUSES:  # forget the oldest pause that holds no KV
            oldest = next((k for k, q in self.paused.items() if q.req is None), None)
            if oldest is None:
                break
            del self.paused[oldest]
        return decision.action

    def claim(self, prompt: list[int]) -> BlockTable | None:
        """The next request of a paused conversation: observe its pause, and hand over the kept KV of the longest
        common prefix (None if nothing kept matches). A match repeats the paused turn's whole prompt and at least
        a block — another conversation that merely shares the system prompt is not one. The last prompt token is
        never covered: its forward yields the first new token's logits."""
        bs = self.cache.block_size
        best, best_len = None, 0
        for p in self.paused.values():
            need = max(bs, p.prompt_len)
            if len(prompt) - 1 < need or p.tokens[:need] != prompt[:need]:
                continue  # one slice comparison rules out every other conversation
            n = common_prefix(p.tokens, prompt[: len(prompt) - 1])
            if n > best_len:
                best, best_len = p, n
        if best is None:
            return None
        del self.paused[best.key]
        self.policy.observe_pause(best.tool_names, self.clock() - best.paused_at)
        if best.req is None:
            return None
        table = best.req.table
        self.cache.truncate(table, min(best_len, table.num_tokens))
        return table

    def due(self) -> list[tuple[object, Retention]]:
        """(request, OFFLOAD | DROP) for kept conversations whose recheck says they should now leave the device."""
        now, out = self.clock(), []
        for p in self.kept:
            if p.recheck_at is None or p.recheck_at > now:
                continue
            d = self.policy.decide(self._conversation(p), self._memory(p))
            p.recheck_at = None if d.recheck_after_s is None else now + d.recheck_after_s
            if d.action is not Retention.KEEP:
                out.append((p.req, d.action))
                self._let_go(p)
        return out

    def evict(self, blocks_needed: int) -> list[tuple[object, Retention]]:
        """Kept conversations to move out so that `blocks_needed` more blocks are free, the policy's cheapest per
        byte first; each comes with OFFLOAD or DROP. Fewer than needed if everything kept is not enough."""
        kept = {p.key: p for p in self.kept}
        if not kept or blocks_needed <= 0:
            return []
        bpb = self.cache.bytes_per_block()
        chosen = self.policy.choose_evictions([self._conversation(p) for p in kept.values()], self._memory(None),
                                              blocks_needed * bpb)
        out = []
        for d in chosen:
            out.append((kept[d.conversation_id].req, d.action))
            self._let_go(kept[d.conversation_id])
        return out

    def let_go_all(self) -> list[object]:
        """Every kept request, let go (the verifier is stopping): the caller frees their KV."""
        reqs = []
        for p in self.kept:
            reqs.append(p.req)
            self._let_go(p)
        return reqs

    def _let_go(self, p: Paused) -> None:
        """The caller frees p's KV; the record stays, to learn the pause when the conversation comes back."""
        p.req, p.recheck_at = None, None

    def _conversation(self, p: Paused) -> PausedConversation:
        return PausedConversation(p.key, p.kv_tokens, p.tool_names, max(0.0, self.clock() - p.paused_at))

    def _memory(self, p: Paused | None) -> MemoryState:
        used = self.cache.allocator.num_blocks - self.cache.num_free_blocks
        if p is not None and p.req is not None:
            used -= len(p.req.table.blocks)
        return MemoryState(used_bytes=used * self.cache.bytes_per_block())
