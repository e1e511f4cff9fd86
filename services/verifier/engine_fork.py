"""Prefill a prompt once for the identical prompts admitted together (`n` > 1: the gateway sends n Generates with
the same prompt_token_ids), and give each other request a private copy of its KV.

A request *follows* a leader admitted in the same round (one `SpecEngine.add`, or every admission of one
`execute`) when its prompt is the same token list and its table holds the same number of its tokens already (the
same cached prefix): the leader prefills the rest, then the follower's blocks for those positions are reserved and
the leader's K/V copied into them (`PagedKVCache.move_slots` over the flat slots), so each request still owns
every block it writes and nothing downstream changes. The follower draws its first token from the leader's logits
after the last prompt token, with its own sampling parameters, generator, grammar mask and logprobs.

A leader is forgotten when its round ends; one whose KV no longer holds exactly its prompt (its prefill failed
and was freed) leads nobody. Identical prompts that arrive a step apart (the n Generates race to the verifier)
share too, but for the last prompt token: while the earlier one runs, a later one copies its KV of the prompt but
the last token, and prefills that one token for its logits (as after a prefix-cache hit).
Chunked prefill (`--prefill-chunk`) does not fork: each request prefills its own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from specrelay.shared.modeling.kv_cache import PagedKVCache


class PromptForks:
    def __init__(self, cache: PagedKVCache):
        self.cache = cache
        self._leaders: dict[tuple[tuple[int, ...], int], tuple[Any, torch.Tensor]] = {}
        self._keys: dict[int, tuple[tuple[int, ...], int]] = {}  # a leader's key until its prefill is done
        self.copied: dict[int, int] = {}  # request id -> prompt tokens a request got by copy, this round
        self._live: dict[tuple[int, ...], Any] = {}  # prompt -> the last request that prefilled it, while it has KV
        self._depth = 0

    @contextlib.contextmanager
    def round(self) -> Iterator[None]:
        """Leaders recorded inside are followed by requests admitted inside; nested rounds share the outer one."""
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if not self._depth:
                self._leaders.clear()
                self._keys.clear()
                self.copied.clear()
                self._live = {p: r for p, r in self._live.items() if r.finish_reason is None}

    @staticmethod
    def _key(req: Any) -> tuple[tuple[int, ...], int]:
        return tuple(req.prompt), req.table.num_tokens

    def split(self, requests: list[Any], running: list[Any]) -> tuple[list[Any], list[Any]]:
        """(the requests to prefill, the followers) in their order: a follower's leader is a request of this round
        admitted before it. A request to prefill whose prompt a running request prefilled gets that KV but the
        last token's (`_copy_from_live`)."""
        running_ids = {r.request_id for r in running}
        lead: list[Any] = []
        follow: list[Any] = []
        pending: set[tuple[tuple[int, ...], int]] = set()
        for r in requests:
            key = self._key(r)
            if key in pending or self._leader(key) is not None:
                follow.append(r)
            else:
                pending.add(key)
                self._keys[r.request_id] = key
                lead.append(r)
                self._copy_from_live(r, running_ids)
        return lead, follow

    def _copy_from_live(self, req: Any, running_ids: set[int]) -> None:
        """A leader whose prompt a running request prefilled in an earlier step: copy that one's KV of all the
        prompt but its last token, whose forward gives the logits. Running only: its prompt's positions never
        change while it decodes (it writes after them); a finished one's table may be handed on (a held turn
        claimed by another prompt) and rewritten."""
        live = self._live.get(tuple(req.prompt))
        start, end = req.table.num_tokens, len(req.prompt) - 1
        if live is None or live.request_id not in running_ids or start >= end:
            return
        self._copy(live, req, start, end)

    def prefilled(self, req: Any, logits: torch.Tensor) -> None:
        """A leader's prompt is prefilled; logits: [1, vocab] after its last token (before any grammar mask)."""
        if (key := self._keys.pop(req.request_id, None)) is not None:
            self._leaders[key] = (req, logits)
            self._live[key[0]] = req

    def copy(self, req: Any) -> torch.Tensor | None:
        """Give a follower its leader's prompt KV; returns the leader's logits after the prompt, or None (no
        leader left: the caller prefills it)."""
        key = self._key(req)
        found = self._leader(key)
        if found is None:
            return None
        leader, logits = found
        self._copy(leader, req, req.table.num_tokens, len(req.prompt))
        return logits

    def _copy(self, src: Any, dst: Any, start: int, end: int) -> None:
        """dst's KV of positions start..end-1 (after what its table holds): a copy of src's."""
        bs = self.cache.block_size
        slots = self.cache.reserve(dst.table, end - start)
        self.cache.move_slots([src.table.blocks[p // bs] * bs + p % bs for p in range(start, end)], slots)
        dst.table.num_tokens = end
        self.copied[dst.request_id] = end - start

    def _leader(self, key: tuple[tuple[int, ...], int]) -> tuple[Any, torch.Tensor] | None:
        found = self._leaders.get(key)
        if found is None or found[0].table.num_tokens != len(found[0].prompt):  # its KV is gone or moved on
            return None
        return found
