"""The verifier service: continuous batching of Generate requests from the bus, speculative steps with the drafter
service, tokens streamed back as TokenChunks.

Loop: receive (Generate / Cancel / Continue, inbox.py) -> schedule (scheduler.py: cancels, expiries, then Continues
and Generates while batch slots and KV blocks last, or a decode step) -> load KV (releases to the kvstore, prefixes
and relayed spans from it) -> execute (engine.py, in a worker thread; drafts come from the drafter service, with a
deadline) -> publish the chunks. A request's Generate is acknowledged only once its last chunk is out
(at-least-once: a replica that dies mid-request leaves it to another, which starts over; the gateway drops tokens it
already has). While it serves a request the bus renews the replica's lease on it, so no other replica takes it
however long it runs (bus.py).

A failure that belongs to one request (its prefill, a bad Continue) answers that request with an error chunk and
frees its KV; a failure of a whole step fails the requests in it; the replica goes on serving either way. The bus
being away is retried (bus.py), and what could not be sent waits in the outbox, in order, for the next step; the
kvstore being away costs its reuse, never a request.

However run() ends (cancelled, the bus closed), close() gives back what the replica holds: KV blocks, the kvstore's
connections or segments, and its own Continue stream and Cancel group on the bus.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from dataclasses import dataclass

from specrelay.services.verifier.config import VerifierConfig
from specrelay.services.verifier.handoffs import Admit, Release, Reply, StepPlan, StepResult, Unpause
from specrelay.services.verifier.inbox import Inbox
from specrelay.services.verifier.ledger import Ledger
from specrelay.services.verifier.scheduler import CacheBudget, Scheduler, SchedulerConfig
from specrelay.shared.bus import Bus, BusUnavailable, Delivery
from specrelay.shared.messages import KV_STREAM, Cancel, Continue, Generate, KvReport, Preempt, TokenChunk
from specrelay.shared.modeling.kv_cache import BlockTable

__all__ = ["VerifierConfig", "VerifierService"]

log = logging.getLogger(__name__)

_BUS_PAUSE_S = 0.5  # after the bus stayed away past its retries: pause, then go on serving


@dataclass
class Outgoing:
    """A chunk to send and/or a delivery to acknowledge, in order; each part done once."""

    reply_to: str | None
    chunk: TokenChunk | None
    ack: Delivery | None


class VerifierService:
    def __init__(self, cfg: VerifierConfig, bus: Bus, engine=None):
        from specrelay.services.verifier.remote import RemoteDrafter
        from specrelay.shared.pte_profiles import find_profile

        self.cfg, self.bus = cfg, bus
        self.engine = engine if engine is not None else _load_engine(cfg)
        runner = self.engine.runner
        self.store, self.prefix, self.relay = _kv_reuse(cfg, runner)
        self.pte_profile, self.pte_source = find_profile(cfg.pte_profile, cfg.model_dir or None, cfg.device,
                                                         runner.model)
        self.retention = None
        if cfg.client_retention:
            from specrelay.services.verifier.client_retention import ClientRetention

            self.retention = ClientRetention.for_cache(runner.cache, self.pte_profile, self.prefix is not None,
                                                       cfg.kvstore_bytes_per_s)
        if cfg.prefill_chunk:
            from specrelay.services.verifier.chunked_prefill import ChunkedPrefill

            self.engine.chunked = ChunkedPrefill(runner, cfg.prefill_chunk)
        self.scheduler = Scheduler(SchedulerConfig(cfg.max_batch, cfg.max_nodes, runner.max_model_len, cfg.max_hold_s,
                                                   chunked_prefill=cfg.prefill_chunk > 0),
                                   CacheBudget(runner.cache), self.retention,
                                   new_ledger=lambda: Ledger(self.pte_profile, self.pte_source))
        self.drafter = RemoteDrafter(bus, cfg.draft_timeout_s) if cfg.speculate else None
        self.inbox = Inbox(bus, cfg.consumer, int(cfg.cancel_replay_s * 1000))
        self.outbox: list[Outgoing] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._work: asyncio.Future | None = None  # the engine call running in a worker thread
        self._reported_used, self._reported_at = (-1, -1), 0.0

    # What the scheduler holds, by the names tests and tools read.
    held = property(lambda self: self.scheduler.held)
    live = property(lambda self: self.scheduler.running)
    waiting = property(lambda self: self.scheduler.waiting)

    async def run(self) -> None:
        """Serve until cancelled or the bus closes; either way, close() gives back what this replica holds."""
        me, self._loop = asyncio.current_task(), asyncio.get_running_loop()
        self.inbox.start()
        try:
            while self.inbox.feeding():
                if me.cancelling():  # a client library below (redis-py) can swallow a CancelledError: honour it
                    raise asyncio.CancelledError
                for delivery in await self.inbox.receive(block=not (self.scheduler.busy or self.outbox)):
                    await self._take(delivery)
                plan = self.scheduler.schedule()
                await self._load_kv(plan)
                result = await self._execute(plan)
                await self._publish(_with_logprobs(self.scheduler.update(plan, result), result))
                if self.drafter is not None and result.decoded:
                    await self.drafter.feedback(result.verified, result.names, result.released)
                try:
                    await self._flush()
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
                self.scheduler.add_request(delivery, first_turn=False)
        if self._work is not None:  # a cancelled run() leaves its engine call running in the thread: let it end
            await asyncio.gather(self._work, return_exceptions=True)
        running, continues, free = self.scheduler.close()
        self.engine.execute(StepPlan(cancelled=running))
        for kv in free:  # unpublished: stopping should be quick, and an in-process store closes with the service
            self.engine.release(kv)
        bus_open = not self.bus.closed
        if bus_open:
            error = f"verifier {self.cfg.consumer} stopped"
            self.outbox += [Outgoing(None, None, d) for d in self.scheduler.cancel_acks]
            self.outbox += [_error(d, error) for d in continues]
            self.scheduler.cancel_acks = []
            try:
                await self._flush()
            except BusUnavailable as e:
                log.warning("verifier %s: %s; stopping anyway", self.cfg.consumer, e)
        self.outbox.clear()
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
        kept = self.scheduler.num_kept_blocks()
        now = time.time()
        if (used, kept) != self._reported_used or now - self._reported_at >= heartbeat_s:
            await self.bus.publish(KV_STREAM, KvReport(self.cfg.consumer, used, cache.allocator.num_blocks, now,
                                                       blocks_kept=kept))
            self._reported_used, self._reported_at = (used, kept), now

    # -- receive -------------------------------------------------------------------------------------------------

    async def _take(self, delivery: Delivery) -> None:
        if isinstance(delivery.msg, Cancel):
            self.scheduler.add_cancel(delivery)
        elif isinstance(delivery.msg, Preempt):
            self.scheduler.add_preempt(delivery)
        else:
            again = self.scheduler.add_request(delivery, first_turn=isinstance(delivery.msg, Generate))
            self.outbox += [Outgoing(None, None, d) for d in again]

    # -- load KV -------------------------------------------------------------------------------------------------

    async def _load_kv(self, plan: StepPlan) -> None:
        """Before the engine runs: what the plan gave up acknowledged or answered (in the outbox), KV leaving the
        device published and freed, and each admission's table filled from the kvstore."""
        self.outbox += [Outgoing(None, None, d) for d in plan.acks]
        self.outbox += [_error(r.delivery, r.error) for r in plan.rejects]
        for release in plan.releases:
            await self._release(release)
        for unpause in plan.unpaused:
            await self._reload(unpause)
        for admit in plan.admits:
            await self._reuse(admit)

    async def _release(self, release: Release) -> None:
        """KV leaving the device: saved to the prefix cache first when it should be (and is on), then freed."""
        try:
            if release.publish and self.prefix is not None:
                await self.prefix.save(release.kv.table, release.kv.tokens)
        except Exception as e:  # noqa: BLE001 - the kvstore away costs later reuse; the blocks are freed anyway
            log.warning("verifier %s: could not save a finished request's prefix (%r)", self.cfg.consumer, e)
        finally:
            self.engine.release(release.kv)

    async def _reload(self, unpause: Unpause) -> None:
        """A preempted request whose KV was released goes on: what the prefix cache has of it is loaded back (the
        engine prefills the rest); the store being away only costs the reuse."""
        if not unpause.reload or self.prefix is None or unpause.kv.table.num_tokens:
            return
        try:
            await self.prefix.load(unpause.kv.table, unpause.kv.tokens)
        except Exception as e:  # noqa: BLE001 - the engine prefills the whole context instead
            log.warning("verifier %s: the kvstore failed (%r); recomputing a resumed request", self.cfg.consumer, e)
            self.engine.release(unpause.kv.table)

    async def _reuse(self, admit: Admit) -> None:
        """Fill the admission's table from the kvstore: the cached prefix, then relayed spans. The store being
        unreachable only costs the reuse: the table is emptied and the prompt prefilled whole."""
        table = admit.table = admit.table if admit.table is not None else BlockTable()
        try:
            if self.prefix is not None and table.num_tokens == 0:
                await self.prefix.load(table, admit.prompt)
            admit.cached_tokens = table.num_tokens
            admit.relay = await self.relay.admit(table, admit.prompt) if self.relay is not None else None
        except Exception as e:  # noqa: BLE001 - whatever the store's failure, the request runs without it
            log.warning("verifier %s: the kvstore failed (%r); prefilling without reuse", self.cfg.consumer, e)
            self.engine.release(table)
            admit.cached_tokens, admit.relay = 0, None

    # -- execute -------------------------------------------------------------------------------------------------

    async def _execute(self, plan: StepPlan) -> StepResult:
        if not plan.runs_engine:
            return StepResult()
        return await self._in_thread(self.engine.execute, plan, self._draft if self.drafter is not None else None)

    async def _in_thread(self, fn, *args):
        """fn(*args) in a worker thread, shielded: a cancellation cannot stop the thread, so close() waits for it
        before freeing KV that the engine may still be writing."""
        self._work = asyncio.ensure_future(asyncio.to_thread(fn, *args))
        return await asyncio.shield(self._work)

    def _draft(self, inputs, names: dict[int, str]):
        """In the engine's thread: the drafter service's trees for this step (None: plain decoding), asked on the
        event loop."""
        future = asyncio.run_coroutine_threadsafe(self.drafter.propose(inputs, names), self._loop)
        try:
            return future.result()
        except (Exception, concurrent.futures.CancelledError) as e:  # noqa: BLE001 - a draft costs speed only
            log.warning("verifier %s: no draft this step (%r)", self.cfg.consumer, e)
            return None

    # -- publish -------------------------------------------------------------------------------------------------

    async def _publish(self, replies: list[Reply]) -> None:
        for reply in replies:
            msg = reply.serving.msg
            if reply.finish_reason is None:
                self.outbox.append(Outgoing(msg.reply_to, TokenChunk(msg.request_id, reply.token_ids,
                                                                     offset=reply.offset, logprobs=reply.logprobs),
                                            None))
            elif reply.finish_reason == "error":
                self.outbox.append(_error(reply.serving.delivery, reply.error))
            else:
                self.outbox.append(Outgoing(msg.reply_to, await self._finish(reply), reply.serving.delivery))

    async def _finish(self, reply: Reply) -> TokenChunk:
        """A finished turn: its output's decode KV to the relay index (held or not: the next agent may quote it
        soon), its usage, its KV released unless held; the last chunk."""
        serving, turn = reply.serving, reply.turn
        msg, first = serving.msg, serving.first_turn
        if reply.finish_reason != "cancelled" and self.relay is not None:
            try:
                await self.relay.publish(turn.kv.table, turn.num_prompt_tokens, turn.output)
            except Exception as e:  # noqa: BLE001 - the kvstore away costs the reuse, not the answer
                log.warning("verifier %s: could not relay %s's output (%r)", self.cfg.consumer, msg.request_id, e)
        usage = serving.ledger.add_turn(turn, serving.cached_tokens, serving.carried, serving.relay,
                                        msg.evicted_tokens if first else 0, 0 if first else msg.tool_response_tokens)
        if reply.release is not None:
            await self._release(reply.release)
        return TokenChunk(msg.request_id, reply.token_ids, offset=reply.offset, finish_reason=reply.finish_reason,
                          usage=usage, holder=self.cfg.consumer if reply.held else None, logprobs=reply.logprobs)

    async def _flush(self) -> None:
        """Send the outbox in order; what the bus refuses stays for the next step."""
        while self.outbox:
            out = self.outbox[0]
            if out.chunk is not None:
                await self.bus.reply(out.reply_to, out.chunk)
                out.chunk = None
            if out.ack is not None:
                await out.ack.ack()
            self.outbox.pop(0)


def _with_logprobs(replies: list[Reply], result: StepResult) -> list[Reply]:
    """A reply's tokens are what the engine committed for its request this step: so are their logprobs."""
    logprobs = {out.request_id: out.logprobs for out in result.outputs if out.logprobs is not None}
    for reply in replies:
        lps = logprobs.get(reply.serving.msg.request_id)
        if reply.finish_reason != "error" and lps is not None and len(lps) == len(reply.token_ids):
            reply.logprobs = lps
    return replies


def _error(delivery: Delivery, error: str) -> Outgoing:
    """A request that failed here and would fail anywhere: an error chunk, then its acknowledgement."""
    msg = delivery.msg
    return Outgoing(msg.reply_to, TokenChunk(msg.request_id, [], finish_reason="error", error=error), delivery)


def _load_engine(cfg: VerifierConfig):
    from specrelay.services.verifier.engine import SpecEngine
    from specrelay.shared.grammar_mask import Constraints
    from specrelay.shared.modeling.loader import load_model
    from specrelay.shared.modeling.runner import ModelRunner

    runner = ModelRunner(load_model(cfg.model_dir, device=cfg.device), cfg.num_blocks, cfg.block_size)
    # drafts come from the drafter service over the bus, not from an in-process proposer
    # a client's `seed` gives the same output whatever else the server runs (shared/seeded_draws.py)
    engine = SpecEngine(runner, proposer=None, max_nodes=cfg.max_nodes, speculate=cfg.speculate,
                        positional_seeds=True)
    engine.constraints = Constraints.for_model(cfg.model_dir, runner.model.config.vocab_size)  # structured outputs
    return engine


def _kv_reuse(cfg: VerifierConfig, runner):
    """(store, prefix cache, relay) over the kvstore, each None when off."""
    if not ((cfg.prefix_caching or cfg.relay.enabled) and cfg.model_dir):
        return None, None, None
    from specrelay.services.kvstore import make_store
    from specrelay.services.verifier.prefix_cache import PrefixCache, model_id
    from specrelay.services.verifier.relay_hooks import VerifierRelay

    store = make_store(cfg.kvstore, cfg.kvstore_capacity_bytes, prefix=cfg.kvstore_prefix)
    mid = model_id(cfg.model_dir, runner.model.dtype)
    prefix = PrefixCache(store, mid, runner.cache) if cfg.prefix_caching else None
    relay = VerifierRelay(runner, store, mid, cfg.relay) if cfg.relay.enabled else None
    return store, prefix, relay
