"""The verifier service: continuous batching of Generate requests from the bus, speculative steps with the drafter
service, tokens streamed back as TokenChunks.

Loop: receive (Generate / Cancel / Continue, inbox.py) -> admit while batch slots and KV blocks last (Continues go
on from held KV, continues.py) -> plan, draft (remote, with a deadline), verify -> publish new tokens. A request's
Generate is acknowledged only once its last chunk is out (at-least-once: a replica that dies mid-request leaves it
to another, which starts over; the gateway drops tokens it already has). While it serves a request the bus renews
the replica's lease on it, so no other replica takes it however long it runs (bus.py).

Admission is idempotent by request id: a second delivery of a request this replica is serving, queueing or has
just finished (a copy the gateway republished after a Redis restart, or the same entry handed back) is not served
twice; the newer copy backs the request and the older one is acknowledged. A failure that belongs to one request
(its prefill, a bad Continue) answers that request with an error chunk and frees its KV; a failure of a whole step
fails the requests in it; the replica goes on serving either way. The bus being away is retried (bus.py); the
kvstore being away costs its reuse, never a request.

However run() ends (cancelled, the bus closed), close() gives back what the replica holds: KV blocks, the kvstore's
connections or segments, and its own Continue stream and Cancel group on the bus.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from specrelay.services.verifier.continues import Continuations
from specrelay.services.verifier.held import Ledger
from specrelay.services.verifier.inbox import Inbox
from specrelay.services.verifier.relay import RelayConfig
from specrelay.shared.bus import Bus, BusUnavailable, Delivery
from specrelay.shared.messages import KV_STREAM, Cancel, Continue, Generate, KvReport, RelayUsage, TokenChunk
from specrelay.shared.modeling.kv_cache import BlockTable
from specrelay.shared.sampling import SamplingParams

log = logging.getLogger(__name__)

_REMEMBER_FINISHED = 10_000  # finished request ids remembered, so a late second copy of one is not served again
_BUS_PAUSE_S = 0.5  # after the bus stayed away past its retries: pause, then go on serving


@dataclass
class VerifierConfig:
    model_dir: str
    redis: str | None = None
    consumer: str = f"verifier-{socket.gethostname()}-{os.getpid()}"  # pid 1 in every container
    speculate: bool = True  # ask the drafter service for trees
    max_nodes: int = 16
    num_blocks: int = 2048
    block_size: int = 16
    max_batch: int = 32
    draft_timeout_s: float = 0.5
    device: str = "cpu"
    prefix_caching: bool = True  # reuse finished requests' KV for prompts that start with the same tokens
    kvstore: str | None = None  # None: a store in this process; redis://... or shm://NAME to share across replicas
    kvstore_capacity_bytes: int = 512 << 20
    kvstore_prefix: str = "specrelay:"  # Redis key prefix of the store
    relay: RelayConfig = field(default_factory=RelayConfig)  # publish outputs' decode KV; reuse quoted ones
    report_kv: bool = True  # publish KvReports for gateways in other processes (serve shares the cache directly)
    pte_profile: str | None = None  # usage.pte's profile file; None: the calibrated one, else analytic (calibrate.py)
    max_hold_s: float = 300.0  # the longest a finished request's KV is held for a Continue (held.py)
    client_retention: bool = True  # keep / offload / drop KV across client tool pauses (client_retention.py)
    kvstore_bytes_per_s: float = 2e9  # what that policy prices an offload and reload at (in-process store: ~2 GB/s)
    # A new replica reads the Cancels of this last while (a request it takes over may have been cancelled before it
    # started), not every Cancel the stream retains.
    cancel_replay_s: float = 60.0


@dataclass
class Live:
    delivery: Delivery
    msg: Generate | Continue
    request_id: int  # the engine's id
    sent: int = 0  # output tokens already published
    relay: RelayUsage | None = None  # what the prefill reused of earlier requests' outputs
    ledger: Ledger = field(default_factory=Ledger)  # usage over the request's turns (a Continue carries it on)
    carried: int = 0  # context tokens a held table brought to this turn


class VerifierService:
    def __init__(self, cfg: VerifierConfig, bus: Bus, engine=None):
        from specrelay.services.verifier.engine import SpecEngine
        from specrelay.services.verifier.remote import RemoteDrafter
        from specrelay.shared.modeling.loader import load_model
        from specrelay.shared.modeling.runner import ModelRunner

        self.cfg, self.bus = cfg, bus
        if engine is None:
            runner = ModelRunner(load_model(cfg.model_dir, device=cfg.device), cfg.num_blocks, cfg.block_size)
            # drafts come from the drafter service over the bus, not from an in-process proposer
            engine = SpecEngine(runner, proposer=None, max_nodes=cfg.max_nodes, speculate=cfg.speculate)
        self.engine = engine
        self.store = self.prefix = self.relay = None
        if (cfg.prefix_caching or cfg.relay.enabled) and cfg.model_dir:
            from specrelay.services.kvstore import make_store
            from specrelay.services.verifier.prefix_cache import PrefixCache, model_id
            from specrelay.services.verifier.relay_hooks import VerifierRelay

            self.store = make_store(cfg.kvstore, cfg.kvstore_capacity_bytes, prefix=cfg.kvstore_prefix)
            runner = engine.runner
            mid = model_id(cfg.model_dir, runner.model.dtype)
            self.prefix = PrefixCache(self.store, mid, runner.cache) if cfg.prefix_caching else None
            self.relay = VerifierRelay(runner, self.store, mid, cfg.relay) if cfg.relay.enabled else None
        engine.keep_finished = True  # _finish publishes the KV and frees it, or holds it for a Continue
        from specrelay.services.calibrate import find_profile

        self.pte_profile, self.pte_source = find_profile(cfg.pte_profile, cfg.model_dir or None, cfg.device,
                                                         engine.runner.model)
        retention = None
        if cfg.client_retention:
            from specrelay.services.verifier.client_retention import ClientRetention

            retention = ClientRetention.for_cache(engine.runner.cache, self.pte_profile, self.prefix is not None,
                                                  cfg.kvstore_bytes_per_s)
        self.turns = Continuations(engine, bus, self.prefix, retention, cfg.max_nodes, cfg.max_hold_s)
        self.held, self.retention = self.turns.held, retention
        self.drafter = RemoteDrafter(bus, cfg.draft_timeout_s) if cfg.speculate else None
        self.inbox = Inbox(bus, cfg.consumer, int(cfg.cancel_replay_s * 1000))
        self.waiting: list[Delivery] = []
        self.live: dict[str, Live] = {}
        self.cancelled: dict[str, tuple[str, ...]] = {}  # request id -> client tool names (Cancel.tool_names)
        self.cancel_acks: list[Delivery] = []  # acknowledged in turn, not all at once (a replay can be long)
        self.finished: OrderedDict[str, None] = OrderedDict()  # the last _REMEMBER_FINISHED Generates served
        self._work: asyncio.Future | None = None  # the engine call running in a worker thread
        self._reported_used, self._reported_at = (-1, -1), 0.0

    async def run(self) -> None:
        """Serve until cancelled or the bus closes; either way, close() gives back what this replica holds."""
        me = asyncio.current_task()
        self.inbox.start()
        try:
            while self.inbox.feeding():
                if me.cancelling():  # a client library below (redis-py) can swallow a CancelledError: honour it
                    raise asyncio.CancelledError
                for delivery in await self.inbox.receive(block=not self.live):
                    await self._take(delivery)
                try:
                    await self.admit()
                    await self.report_kv()
                    if self.live:
                        await self.step()
                        await self.report_kv()
                except BusUnavailable as e:  # what was not sent is sent at the next step, or redelivered
                    log.warning("verifier %s: %s; going on", self.cfg.consumer, e)
                    await asyncio.sleep(_BUS_PAUSE_S)
        finally:
            await self.close()

    async def close(self) -> None:
        """Give back what this replica holds, once it has stopped serving: the engine's requests and every held,
        kept or claimed table freed; Continues received and not started answered with an error (the sender falls
        back to a fresh Generate); the kvstore closed; this replica's own stream and group deleted (inbox.py).
        Generates not finished stay unacknowledged, for another replica to take over (bus.py). Harmless twice."""
        for delivery in await self.inbox.stop():
            if isinstance(delivery.msg, Continue):
                self.turns.receive(delivery)
        for delivery in self.cancel_acks:
            await delivery.ack()
        self.cancel_acks.clear()
        if self._work is not None:  # a cancelled run() leaves its engine call running in the thread: let it end
            await asyncio.gather(self._work, return_exceptions=True)
        for live in self.live.values():
            self.engine.cancel(live.request_id)
        self.live.clear()
        bus_open = not self.bus.closed
        await self.turns.close(f"verifier {self.cfg.consumer} stopped" if bus_open else None)
        if self.store is not None:
            await self.store.close()
        if self.drafter is not None:
            self.drafter.close()
        if bus_open:
            await self.inbox.delete_own()
        else:
            log.warning("verifier %s: the bus closed first; %s stays", self.cfg.consumer, self.inbox.continue_stream)

    async def report_kv(self, heartbeat_s: float = 2.0) -> None:
        if not self.cfg.report_kv:
            return
        cache = self.engine.runner.cache
        used = cache.allocator.num_blocks - cache.num_free_blocks
        kept = self.held.num_blocks() + (self.retention.num_blocks() if self.retention is not None else 0)
        now = time.time()
        if (used, kept) != self._reported_used or now - self._reported_at >= heartbeat_s:
            await self.bus.publish(KV_STREAM, KvReport(self.cfg.consumer, used, cache.allocator.num_blocks, now,
                                                       blocks_kept=kept))
            self._reported_used, self._reported_at = (used, kept), now

    async def _take(self, delivery: Delivery) -> None:
        if isinstance(msg := delivery.msg, Cancel):
            self.cancelled[msg.request_id] = tuple(msg.tool_names) or self.cancelled.get(msg.request_id, ())
            self.cancel_acks.append(delivery)
        elif not await self._duplicate(delivery):
            if isinstance(msg, Continue):
                self.turns.receive(delivery)
            else:
                self.waiting.append(delivery)

    async def _duplicate(self, delivery: Delivery) -> bool:
        """Whether this Generate or Continue is one this replica already has (running, queued, or a Generate just
        finished). The copy that came last backs the request from now on: after a Redis restart only it exists.
        The same entry delivered again needs no acknowledgement of its own."""
        msg = delivery.msg
        rid = msg.request_id
        if isinstance(msg, Generate) and rid in self.finished:
            log.info("verifier %s: request %s again, already served; dropped", self.cfg.consumer, rid)
            await delivery.ack()
            return True
        live = self.live.get(rid)
        if live is not None and type(live.msg) is type(msg):
            old, live.delivery = live.delivery, delivery
        else:
            queue = self.waiting if isinstance(msg, Generate) else self.turns.queue
            i = next((i for i, d in enumerate(queue) if d.msg.request_id == rid), None)
            if i is None:
                return False
            old, queue[i] = queue[i], delivery
        log.info("verifier %s: request %s delivered again while it is here; served once", self.cfg.consumer, rid)
        if (old.stream, old.message_id) != (delivery.stream, delivery.message_id):
            await old.ack()
        return True

    async def admit(self) -> None:
        """Cancels, then expiries, then Continues (their KV is already here), then new Generates in order, while
        batch slots and KV blocks last."""
        for rid, tool_names in self.cancelled.items():
            if rid in self.live:
                live = self.live.pop(rid)
                await self._finish(live, "cancelled", self.engine.cancel(live.request_id))
            for delivery in [d for d in self.waiting if d.msg.request_id == rid]:
                self.waiting.remove(delivery)
                await delivery.ack()  # the sender gave up on it: nobody else should start it
            await self.turns.cancel(rid, tool_names)
        self.cancelled.clear()
        while self.cancel_acks:
            await self.cancel_acks.pop().ack()
        await self.turns.expire()
        while len(self.live) < self.cfg.max_batch and (resume := await self.turns.next_resume(self._headroom)):
            msg, held = resume.delivery.msg, resume.held
            try:
                req = await self._in_thread(self.engine.extend, held.req, msg.token_ids, _params(msg.sampling))
            except Exception as e:  # this Continue alone fails; its held KV goes with it
                log.exception("verifier %s: Continue of %s failed", self.cfg.consumer, msg.request_id)
                self.engine.release(held.req)
                await self._fail(resume.delivery, f"the verifier could not continue this request: {e}")
                continue
            await self._start(Live(resume.delivery, msg, req.request_id, ledger=held.ledger,
                                   carried=req.stats.cached_tokens), req)
        while self.waiting and len(self.live) < self.cfg.max_batch:
            msg: Generate = self.waiting[0].msg
            if error := self._check(msg):
                await self.bus.reply(msg.reply_to, TokenChunk(msg.request_id, [], finish_reason="error", error=error))
                self._remember(msg.request_id)
                await self.waiting.pop(0).ack()
                continue
            need = self._blocks(len(msg.prompt_token_ids))
            if not await self.turns.make_room(msg.request_id, msg.prompt_token_ids, need, self._headroom):
                break  # wait for running requests to free blocks
            delivery = self.waiting.pop(0)
            table = self.turns.take_claim(msg.request_id) or BlockTable()
            try:
                relay, cached = await self._reuse(table, msg.prompt_token_ids)
                [req] = await self._in_thread(self.engine.add, [msg.prompt_token_ids], [_params(msg.sampling)],
                                              [table])
            except Exception as e:  # this request alone fails (its prefill); the others and the replica go on
                log.exception("verifier %s: admitting %s failed", self.cfg.consumer, msg.request_id)
                self.engine.runner.release(table)
                self._remember(msg.request_id)
                await self._fail(delivery, f"the verifier could not start this request: {e}")
                continue
            req.stats.cached_tokens = cached  # the engine counts relay-prefilled tokens too; usage reports them apart
            await self._start(Live(delivery, msg, req.request_id, relay=relay,
                                   ledger=Ledger(self.pte_profile, self.pte_source)), req)

    async def _reuse(self, table: BlockTable, prompt: list[int]) -> tuple[RelayUsage | None, int]:
        """Fill `table` from the kvstore: the cached prefix, then relayed spans. (relay usage, tokens cached). The
        store being unreachable only costs the reuse: the table is emptied and the prompt prefilled whole."""
        try:
            if self.prefix is not None and table.num_tokens == 0:
                await self.prefix.load(table, prompt)
            cached = table.num_tokens
            return (await self.relay.admit(table, prompt) if self.relay is not None else None), cached
        except Exception as e:  # noqa: BLE001 - whatever the store's failure, the request runs without it
            log.warning("verifier %s: the kvstore failed (%r); prefilling without reuse", self.cfg.consumer, e)
            self.engine.runner.release(table)
            return None, 0

    async def _fail(self, delivery: Delivery, error: str) -> None:
        """Answer one request with an error chunk and acknowledge it: it failed here and would fail anywhere."""
        msg = delivery.msg
        try:
            await self.bus.reply(msg.reply_to, TokenChunk(msg.request_id, [], finish_reason="error", error=error))
        finally:
            await delivery.ack()

    def _remember(self, request_id: str) -> None:
        self.finished[request_id] = None
        while len(self.finished) > _REMEMBER_FINISHED:
            self.finished.popitem(last=False)

    def _blocks(self, num_tokens: int) -> int:
        """Blocks a request of `num_tokens` needs to run: its tokens and a draft tree's."""
        return -(-(num_tokens + self.cfg.max_nodes + 1) // self.engine.runner.cache.block_size)

    def _headroom(self) -> int:
        """Free blocks beyond two kept for each running request to grow into."""
        return self.engine.runner.cache.num_free_blocks - len(self.live) * 2

    def _check(self, msg: Generate) -> str | None:
        limit = self.engine.runner.max_model_len
        if not msg.prompt_token_ids:
            return "the prompt is empty"
        if len(msg.prompt_token_ids) >= limit:
            return f"the prompt has {len(msg.prompt_token_ids)} tokens; this model's context is {limit}"
        if self._blocks(len(msg.prompt_token_ids)) > self.engine.runner.cache.allocator.num_blocks:
            return f"the prompt has {len(msg.prompt_token_ids)} tokens, more than this verifier's KV cache holds"
        return None

    async def step(self) -> None:
        engine, names = self.engine, {lv.request_id: rid for rid, lv in self.live.items()}
        for orphan in [r.request_id for r in engine.running if r.request_id not in names]:
            log.error("verifier %s: engine request %d has no request id; cancelled", self.cfg.consumer, orphan)
            engine.cancel(orphan)
        inputs = engine.plan() if self.drafter else None
        trees, draft_s = None, 0.0
        if inputs is not None:
            t0 = asyncio.get_running_loop().time()
            trees = await self.drafter.propose(inputs, names)
            draft_s = asyncio.get_running_loop().time() - t0
        try:
            out = await self._in_thread(engine.verify, trees, draft_s)
        except Exception as e:  # the step's requests fail; the replica serves the next ones
            log.exception("verifier %s: a step failed", self.cfg.consumer)
            for rid, live in list(self.live.items()):
                self.live.pop(rid)
                engine.cancel(live.request_id)
                self._remember(rid)
                await self._fail(live.delivery, f"the verifier failed on this request: {e}")
            return
        by_id = {r.request_id: r for r in engine.running + out.finished}
        for rid, live in list(self.live.items()):
            if (req := by_id.get(live.request_id)) is None:  # never expected: fail it rather than the replica
                self.live.pop(rid)
                self._remember(rid)
                await self._fail(live.delivery, "the verifier lost this request")
                continue
            await self._publish(live, req)
        if self.drafter:
            released = [names[r.request_id] for r in out.finished]
            await self.drafter.feedback(out.verified if trees is not None else [], names, released)

    async def _in_thread(self, fn, *args):
        """fn(*args) in a worker thread, shielded: a cancellation cannot stop the thread, so close() waits for it
        before freeing KV that the engine may still be writing."""
        self._work = asyncio.ensure_future(asyncio.to_thread(fn, *args))
        return await asyncio.shield(self._work)

    async def _start(self, live: Live, req) -> None:
        self.live[live.msg.request_id] = live
        await self._publish(live, req)

    async def _publish(self, live: Live, req) -> None:
        if req.finish_reason is not None:
            self.live.pop(live.msg.request_id, None)
            await self._finish(live, req.finish_reason, req)
            return
        new = req.output[live.sent :]
        if new:
            await self.bus.reply(live.msg.reply_to, TokenChunk(live.msg.request_id, new, offset=live.sent))
            live.sent += len(new)

    async def _finish(self, live: Live, reason: str, req) -> None:
        msg, first = live.msg, isinstance(live.msg, Generate)
        if first:
            self._remember(msg.request_id)
        if reason != "cancelled" and self.relay is not None:  # now, held or not: the next agent may quote it soon
            try:
                await self.relay.publish(req.table, len(req.prompt), req.output)
            except Exception as e:  # noqa: BLE001 - the kvstore away costs the reuse, not the answer
                log.warning("verifier %s: could not relay %s's output (%r)", self.cfg.consumer, msg.request_id, e)
        usage = live.ledger.add_turn(req, live.carried, live.relay, msg.evicted_tokens if first else 0,
                                     0 if first else msg.tool_response_tokens)
        held = await self.turns.finish(msg.request_id, req, live.ledger, reason, msg.hold_s)
        new = req.output[live.sent :]
        try:
            await self.bus.reply(msg.reply_to, TokenChunk(msg.request_id, new, offset=live.sent,
                                                          finish_reason=reason, usage=usage,
                                                          holder=self.cfg.consumer if held else None))
        finally:  # even unanswered: this replica holds no lease on a request it no longer serves
            await live.delivery.ack()


def _params(s) -> SamplingParams:
    return SamplingParams(s.temperature, s.top_k, s.top_p, s.seed, s.max_tokens, tuple(s.stop_token_ids))
