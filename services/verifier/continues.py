"""Where a finished turn's KV waits for its conversation to go on, in the verifier service.

A turn that ends by its stop token can go on two ways:
- a server-side tool round: the sender asked for a hold (`Generate.hold_s`) and sends a `Continue` to this
  replica's `continue_stream`; the held table is extended by the new tokens only (the protocol is in held.py);
- a client-side tool pause: the sender releases the hold with the client's tool names (`Cancel.tool_names`); the
  retention policy keeps, offloads or drops the KV until the conversation's next `Generate` claims it by prefix
  (client_retention.py).

`Continuations` is the service's one handle on both. It decides, answers refused Continues and frees KV; the
service runs the engine (`extend`, `add`) and streams the tokens. KV released here goes where any finished
request's goes: the prefix cache when on, then freed. At shutdown (`close`) everything is freed unpublished.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from specrelay.services.toolcoord.retention import Retention
from specrelay.services.verifier.held import Held, HeldRequests, Ledger
from specrelay.shared.bus import Bus, Delivery
from specrelay.shared.messages import Continue, TokenChunk
from specrelay.shared.modeling.kv_cache import BlockTable

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from specrelay.services.verifier.client_retention import ClientRetention
    from specrelay.services.verifier.engine import Request, SpecEngine
    from specrelay.services.verifier.prefix_cache import PrefixCache


@dataclass(frozen=True)
class Resume:
    """A Continue that goes on now: the service extends `held.req` by the Continue's tokens."""

    delivery: Delivery[Continue]  # acknowledged once the resumed turn's last chunk is out
    held: Held  # its table holds the conversation's KV; its ledger carries the usage of the turns so far


class Continuations:
    def __init__(self, engine: SpecEngine, bus: Bus, prefix: PrefixCache | None, retention: ClientRetention | None,
                 max_nodes: int, max_hold_s: float):
        self.engine, self.bus, self.prefix, self.retention = engine, bus, prefix, retention
        self.max_nodes = max_nodes  # a resumed turn needs room for a draft tree beyond its tokens, as a new one
        self.max_hold_s = max_hold_s
        self.held = HeldRequests()
        self.queue: list[Delivery[Continue]] = []  # received, waiting for a batch slot and blocks
        self.claimed: dict[str, BlockTable] = {}  # kept KV that a waiting Generate has claimed by prefix

    # -- a turn ends -----------------------------------------------------------------------------------------------

    async def finish(self, request_id: str, req: Request, ledger: Ledger, reason: str, hold_s: float) -> bool:
        """Hold the turn's KV for a Continue (it ended by a stop token and the sender asked), else release it (a
        cancelled request's KV is already freed). True if held."""
        hold_s = min(hold_s, self.max_hold_s) if reason == "stop" else 0.0
        if hold_s > 0:
            self.held.hold(request_id, req, ledger, hold_s)
            return True
        if reason != "cancelled":
            await self.release(req)
        return False

    async def release(self, req: Request) -> None:
        """A finished request's KV: published for later requests (prefix cache; its relay span went at finish),
        then freed."""
        try:
            if self.prefix is not None:
                await self.prefix.save(req.table, req.tokens)
        except Exception as e:  # noqa: BLE001 - the kvstore away costs later reuse; the blocks are freed anyway
            log.warning("verifier: could not save a finished request's prefix (%r)", e)
        finally:
            self.engine.release(req)

    # -- messages and time -----------------------------------------------------------------------------------------

    def receive(self, delivery: Delivery[Continue]) -> None:
        self.queue.append(delivery)

    async def cancel(self, request_id: str, tool_names: tuple[str, ...] = ()) -> None:
        """A Cancel: KV claimed for the request is freed; a held request is released, with client tool names to
        the retention policy; Continues queued for it are acknowledged unanswered (the sender gave up on them)."""
        if (table := self.claimed.pop(request_id, None)) is not None:
            self.engine.runner.release(table)
        if (held := self.held.take(request_id)) is not None:
            if not tool_names or self.retention is None:
                await self.release(held.req)
            elif (action := self.retention.pause(request_id, held.req, tool_names)) is not Retention.KEEP:
                await self._let_go(held.req, action)
        for delivery in [d for d in self.queue if d.msg.request_id == request_id]:
            self.queue.remove(delivery)
            await delivery.ack()

    async def expire(self) -> None:
        """Holds past their time are released; kept conversations whose recheck says so leave the device."""
        for held in self.held.expired():
            await self.release(held.req)
        for req, action in self.retention.due() if self.retention is not None else ():
            await self._let_go(req, action)

    # -- admission -------------------------------------------------------------------------------------------------

    async def next_resume(self, headroom: Callable[[], int]) -> Resume | None:
        """The first queued Continue that goes on now, its hold taken; None when the queue is empty or its first
        Continue waits for blocks (more than `headroom()` beyond its held table). The caller has a batch slot.
        A Continue that cannot go on is answered with an error chunk, and its held request, if any, released."""
        block_size = self.engine.runner.cache.block_size
        while self.queue:
            msg = self.queue[0].msg
            held = self.held.get(msg.request_id)
            error = (f"request {msg.request_id} is not held here (its hold expired or it was released)"
                     if held is None else self._check(held.req, msg))
            if error is None:
                need = -(-(len(held.req.tokens) + len(msg.token_ids) + self.max_nodes + 1) // block_size)
                if need - len(held.req.table.blocks) > headroom():
                    return None  # wait for running requests to free blocks; the hold's clock keeps running
            delivery = self.queue.pop(0)
            self.held.take(msg.request_id)
            if error is None:
                return Resume(delivery, held)
            if held is not None:
                await self.release(held.req)
            await self.bus.reply(msg.reply_to, TokenChunk(msg.request_id, [], finish_reason="error", error=error))
            await delivery.ack()
        return None

    async def make_room(self, request_id: str, prompt: list[int], need: int, headroom: Callable[[], int]) -> bool:
        """Whether a Generate's `need` blocks, less those of KV kept for its conversation (claimed now), fit in
        `headroom()`; kept conversations are evicted for it, as the retention policy orders."""
        if self.retention is not None and request_id not in self.claimed:
            if (kept := self.retention.claim(prompt)) is not None:
                self.claimed[request_id] = kept
        if request_id in self.claimed:
            need -= len(self.claimed[request_id].blocks)
        short = need - headroom()
        if short > 0 and self.retention is not None:
            for req, action in self.retention.evict(short):
                await self._let_go(req, action)
            short = need - headroom()
        return short <= 0

    def take_claim(self, request_id: str) -> BlockTable | None:
        """The kept KV `make_room` claimed for this Generate, now the Generate's (None if nothing was kept)."""
        return self.claimed.pop(request_id, None)

    # -- shutdown --------------------------------------------------------------------------------------------------

    async def close(self, error: str | None) -> None:
        """Every held, kept or claimed table freed, unpublished: stopping should be quick, and an in-process store
        closes with the service. Queued Continues are answered with `error` and acknowledged, so their senders fall
        back to a fresh Generate now (None: the bus has closed, nobody can be told)."""
        queue, self.queue = self.queue, []
        for delivery in queue if error is not None else ():
            msg = delivery.msg
            await self.bus.reply(msg.reply_to, TokenChunk(msg.request_id, [], finish_reason="error", error=error))
            await delivery.ack()
        for held in self.held.take_all():
            self.engine.release(held.req)
        for req in self.retention.let_go_all() if self.retention is not None else ():
            self.engine.release(req)
        claimed, self.claimed = self.claimed, {}
        for table in claimed.values():
            self.engine.runner.release(table)

    # -- helpers ---------------------------------------------------------------------------------------------------

    async def _let_go(self, req: Request, action: Retention) -> None:
        """OFFLOAD: to the kvstore, then freed; DROP: freed unpublished."""
        if action is Retention.OFFLOAD:
            await self.release(req)
        else:
            self.engine.release(req)

    def _check(self, req: Request, msg: Continue) -> str | None:
        limit = self.engine.runner.max_model_len
        if not msg.token_ids:
            return "a Continue needs tokens to append"
        if len(req.tokens) + len(msg.token_ids) >= limit:
            return (f"the conversation would have {len(req.tokens) + len(msg.token_ids)} tokens; this model's "
                    f"context is {limit}")
        return None
