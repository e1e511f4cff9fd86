"""The verifier service: continuous batching of Generate requests from the bus, speculative steps with the drafter
service, tokens streamed back as TokenChunks.

Loop: receive (Generate / Cancel) -> admit while KV blocks last -> plan, draft (remote, with a deadline), verify ->
publish new tokens; a request's Generate is acknowledged only once its last chunk is out (at-least-once: a replica
that dies mid-request leaves it to another, which starts over; the gateway drops tokens it already has).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import time
from dataclasses import dataclass, field

from specrelay.services.toolcoord.retention import Retention
from specrelay.services.verifier.held import HeldRequests, Ledger
from specrelay.services.verifier.relay import RelayConfig
from specrelay.shared.bus import Bus, Delivery, make_bus
from specrelay.shared.messages import (
    CANCEL_STREAM,
    GENERATE_STREAM,
    KV_STREAM,
    Cancel,
    Continue,
    Generate,
    KvReport,
    RelayUsage,
    TokenChunk,
    continue_stream,
)
from specrelay.shared.modeling.kv_cache import BlockTable
from specrelay.shared.sampling import SamplingParams

log = logging.getLogger(__name__)


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
        self.prefix = self.relay = None
        if (cfg.prefix_caching or cfg.relay.enabled) and cfg.model_dir:
            from specrelay.services.kvstore import make_store
            from specrelay.services.verifier.prefix_cache import PrefixCache, model_id
            from specrelay.services.verifier.relay_hooks import VerifierRelay

            store = make_store(cfg.kvstore, cfg.kvstore_capacity_bytes, prefix=cfg.kvstore_prefix)
            runner = engine.runner
            mid = model_id(cfg.model_dir, runner.model.dtype)
            self.prefix = PrefixCache(store, mid, runner.cache) if cfg.prefix_caching else None
            self.relay = VerifierRelay(runner, store, mid, cfg.relay) if cfg.relay.enabled else None
        engine.keep_finished = True  # _finish publishes the KV and frees it, or holds it for a Continue
        from specrelay.services.calibrate import find_profile

        self.pte_profile, self.pte_source = find_profile(cfg.pte_profile, cfg.model_dir or None, cfg.device,
                                                         engine.runner.model)
        self.held = HeldRequests()
        self.retention = None
        if cfg.client_retention:
            from specrelay.services.verifier.client_retention import ClientRetention

            self.retention = ClientRetention.for_cache(engine.runner.cache, self.pte_profile, self.prefix is not None,
                                                       cfg.kvstore_bytes_per_s)
        self.paused_tools: dict[str, tuple[str, ...]] = {}  # from Cancel(tool_names), until the admit pass
        self.claimed: dict[str, BlockTable] = {}  # kept KV a waiting Generate has claimed by prefix
        self.continues: list[Delivery] = []
        self.drafter = RemoteDrafter(bus, cfg.draft_timeout_s) if cfg.speculate else None
        self.inbox: asyncio.Queue[Delivery] = asyncio.Queue()
        self.waiting: list[Delivery] = []
        self.live: dict[str, Live] = {}
        self.cancelled: set[str] = set()
        self._reported_used, self._reported_at = -1, 0.0

    async def run(self) -> None:
        feeders = [asyncio.create_task(self._feed(GENERATE_STREAM, "verifier", Generate)),
                   asyncio.create_task(self._feed(CANCEL_STREAM, f"cancel-{self.cfg.consumer}", Cancel)),
                   asyncio.create_task(self._feed(continue_stream(self.cfg.consumer), "verifier", Continue))]
        me = asyncio.current_task()
        try:
            while True:
                if me.cancelling():  # a client library below (redis-py) can swallow a CancelledError: honour it
                    raise asyncio.CancelledError
                await self.receive(block=not self.live)
                await self.admit()
                await self.report_kv()
                if self.live:
                    await self.step()
                    await self.report_kv()
        finally:
            for task in feeders:
                task.cancel()

    async def report_kv(self, heartbeat_s: float = 2.0) -> None:
        if not self.cfg.report_kv:
            return
        cache = self.engine.runner.cache
        used = cache.allocator.num_blocks - cache.num_free_blocks
        now = time.time()
        if used != self._reported_used or now - self._reported_at >= heartbeat_s:
            await self.bus.publish(KV_STREAM, KvReport(self.cfg.consumer, used, cache.allocator.num_blocks, now))
            self._reported_used, self._reported_at = used, now

    async def _feed(self, stream: str, group: str, type) -> None:
        async for delivery in self.bus.consume(stream, group, self.cfg.consumer, type):
            await self.inbox.put(delivery)

    async def receive(self, block: bool) -> None:
        if block:
            try:  # wake up now and then, so that run() sees a cancellation even when idle
                async with asyncio.timeout(0.5):
                    self._take(await self.inbox.get())
            except TimeoutError:
                return
        while not self.inbox.empty():
            self._take(self.inbox.get_nowait())

    def _take(self, delivery: Delivery) -> None:
        if isinstance(delivery.msg, Cancel):
            self.cancelled.add(delivery.msg.request_id)
            if delivery.msg.tool_names:
                self.paused_tools[delivery.msg.request_id] = tuple(delivery.msg.tool_names)
            asyncio.ensure_future(delivery.ack())
        elif isinstance(delivery.msg, Continue):
            self.continues.append(delivery)
        else:
            self.waiting.append(delivery)

    async def admit(self) -> None:
        for rid in list(self.cancelled):
            if rid in self.live:
                live = self.live.pop(rid)
                await self._finish(live, "cancelled", self.engine.cancel(live.request_id))
            self.waiting = [d for d in self.waiting if d.msg.request_id != rid]
            if (table := self.claimed.pop(rid, None)) is not None:
                self.engine.runner.release(table)
            if (held := self.held.take(rid)) is not None:
                await self._pause_or_release(rid, held.req)
            for d in [d for d in self.continues if d.msg.request_id == rid]:
                self.continues.remove(d)
                await d.ack()
        self.cancelled.clear()
        self.paused_tools.clear()  # a Cancel(tool_names) for a request not held here
        for held in self.held.expired():
            await self._release(held.req)
        for req, action in self.retention.due() if self.retention is not None else ():
            await self._let_go(req, action)
        await self._resume_held()
        cache = self.engine.runner.cache
        while self.waiting and len(self.live) < self.cfg.max_batch:
            msg: Generate = self.waiting[0].msg
            error = self._check(msg)
            if error:
                await self.bus.reply(msg.reply_to, TokenChunk(msg.request_id, [], finish_reason="error", error=error))
                await self.waiting.pop(0).ack()
                continue
            need = -(-(len(msg.prompt_token_ids) + self.cfg.max_nodes + 1) // cache.block_size)
            if not await self._room(msg, need):
                break  # wait for running requests to free blocks
            delivery = self.waiting.pop(0)
            s = msg.sampling
            params = _params(s)
            table = self.claimed.pop(msg.request_id, None) or BlockTable()
            if self.prefix is not None and table.num_tokens == 0:
                await self.prefix.load(table, msg.prompt_token_ids)
            cached = table.num_tokens
            relay = await self.relay.admit(table, msg.prompt_token_ids) if self.relay is not None else None
            [req] = await asyncio.to_thread(self.engine.add, [msg.prompt_token_ids], [params], [table])
            req.stats.cached_tokens = cached  # the engine counts relay-prefilled tokens too; usage reports them apart
            live = Live(delivery, msg, req.request_id, relay=relay,
                        ledger=Ledger(self.pte_profile, self.pte_source))
            self.live[msg.request_id] = live
            await self._publish(live, req)

    async def _room(self, msg: Generate, need: int) -> bool:
        """Whether `need` blocks (less those of KV kept for this conversation) fit beside the running requests;
        kept conversations are evicted for it, as the retention policy orders (client_retention.py)."""
        cache = self.engine.runner.cache
        if self.retention is not None and msg.request_id not in self.claimed:
            if (kept := self.retention.claim(msg.prompt_token_ids)) is not None:
                self.claimed[msg.request_id] = kept
        if msg.request_id in self.claimed:
            need -= len(self.claimed[msg.request_id].blocks)
        short = need - (cache.num_free_blocks - len(self.live) * 2)
        if short > 0 and self.retention is not None:
            for req, action in self.retention.evict(short):
                await self._let_go(req, action)
            short = need - (cache.num_free_blocks - len(self.live) * 2)
        return short <= 0

    async def _pause_or_release(self, rid: str, req) -> None:
        """A held request released. With client tool names the retention policy decides where its KV waits for
        the conversation's next request; otherwise it is published and freed."""
        tools = self.paused_tools.pop(rid, ())
        if not tools or self.retention is None:
            await self._release(req)
        elif (action := self.retention.pause(rid, req, tools)) is not Retention.KEEP:
            await self._let_go(req, action)

    async def _let_go(self, req, action: Retention) -> None:
        """OFFLOAD: to the kvstore, then freed; DROP: freed unpublished."""
        if action is Retention.OFFLOAD:
            await self._release(req)
        else:
            self.engine.release(req)

    async def _resume_held(self) -> None:
        """Continues extend held requests: only their new tokens are prefilled, on the held table (held.py)."""
        cache = self.engine.runner.cache
        while self.continues and len(self.live) < self.cfg.max_batch:
            msg: Continue = self.continues[0].msg
            held = self.held.get(msg.request_id)
            error = (f"request {msg.request_id} is not held here (its hold expired or it was released)"
                     if held is None else self._check_continue(held.req, msg))
            if error is None:
                need = -(-(len(held.req.tokens) + len(msg.token_ids) + self.cfg.max_nodes + 1) // cache.block_size)
                if need - len(held.req.table.blocks) > cache.num_free_blocks - len(self.live) * 2:
                    break  # wait for running requests to free blocks; the hold's clock keeps running
            delivery = self.continues.pop(0)
            self.held.take(msg.request_id)
            if error is not None:
                if held is not None:
                    await self._release(held.req)
                await self.bus.reply(msg.reply_to, TokenChunk(msg.request_id, [], finish_reason="error", error=error))
                await delivery.ack()
                continue
            req = await asyncio.to_thread(self.engine.extend, held.req, msg.token_ids, _params(msg.sampling))
            live = Live(delivery, msg, req.request_id, ledger=held.ledger, carried=req.stats.cached_tokens)
            self.live[msg.request_id] = live
            await self._publish(live, req)

    def _check_continue(self, req, msg: Continue) -> str | None:
        limit = self.engine.runner.max_model_len
        if not msg.token_ids:
            return "a Continue needs tokens to append"
        if len(req.tokens) + len(msg.token_ids) >= limit:
            return (f"the conversation would have {len(req.tokens) + len(msg.token_ids)} tokens; this model's "
                    f"context is {limit}")
        return None

    def _check(self, msg: Generate) -> str | None:
        limit = self.engine.runner.max_model_len
        cache = self.engine.runner.cache
        if not msg.prompt_token_ids:
            return "the prompt is empty"
        if len(msg.prompt_token_ids) >= limit:
            return f"the prompt has {len(msg.prompt_token_ids)} tokens; this model's context is {limit}"
        if -(-(len(msg.prompt_token_ids) + self.cfg.max_nodes + 1) // cache.block_size) > cache.allocator.num_blocks:
            return f"the prompt has {len(msg.prompt_token_ids)} tokens, more than this verifier's KV cache holds"
        return None

    async def step(self) -> None:
        engine, names = self.engine, {lv.request_id: rid for rid, lv in self.live.items()}
        inputs = engine.plan() if self.drafter else None
        trees, draft_s = None, 0.0
        if inputs is not None:
            t0 = asyncio.get_running_loop().time()
            trees = await self.drafter.propose(inputs, names)
            draft_s = asyncio.get_running_loop().time() - t0
        out = await asyncio.to_thread(engine.verify, trees, draft_s)
        by_id = {r.request_id: r for r in engine.running + out.finished}
        for rid, live in list(self.live.items()):
            await self._publish(live, by_id[live.request_id])
        if self.drafter:
            released = [names[r.request_id] for r in out.finished]
            await self.drafter.feedback(out.verified if trees is not None else [], names, released)

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
        hold_s = min(msg.hold_s, self.cfg.max_hold_s) if reason == "stop" else 0.0
        if reason != "cancelled" and self.relay is not None:  # now, held or not: the next agent may quote it soon
            await self.relay.publish(req.table, len(req.prompt), req.output)
        if reason != "cancelled" and hold_s <= 0:  # a cancelled request's KV is already freed
            await self._release(req)
        usage = live.ledger.add_turn(req, live.carried, live.relay, msg.evicted_tokens if first else 0,
                                     0 if first else msg.tool_response_tokens)
        if hold_s > 0:
            self.held.hold(msg.request_id, req, live.ledger, hold_s)
        new = req.output[live.sent :]
        await self.bus.reply(msg.reply_to, TokenChunk(msg.request_id, new, offset=live.sent, finish_reason=reason,
                                                      usage=usage, holder=self.cfg.consumer if hold_s > 0 else None))
        await live.delivery.ack()

    async def _release(self, req) -> None:
        """A finished request's KV: published for later requests (prefix cache; its relay span went at finish),
        then freed."""
        if self.prefix is not None:
            await self.prefix.save(req.table, req.tokens)
        self.engine.release(req)


def _params(s) -> SamplingParams:
    return SamplingParams(s.temperature, s.top_k, s.top_p, s.seed, s.max_tokens, tuple(s.stop_token_ids))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from specrelay.services.serve import MODELS_DIR

    parser.add_argument("--model", default=str(MODELS_DIR / "target"))
    parser.add_argument("--redis", default=os.environ.get("SPECRELAY_REDIS"), metavar="URL")
    parser.add_argument("--no-speculate", action="store_true", help="plain decoding, no drafter service")
    parser.add_argument("--max-nodes", type=int, default=16, help="largest draft tree verified per request")
    parser.add_argument("--num-blocks", type=int, default=2048)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--pte-profile", default=None, metavar="FILE",
                        help="PTE profile for usage.pte (default: what `specrelay calibrate` cached, else analytic)")
    parser.add_argument("--kvstore", default=os.environ.get("SPECRELAY_KVSTORE"), metavar="URL",
                        help="where prefix KV is shared: redis://... or shm://NAME (default: in this process)")
    parser.add_argument("--kv-capacity", default=os.environ.get("SPECRELAY_KV_CAPACITY", "512M"), metavar="SIZE",
                        help="bytes the prefix KV store may hold (e.g. 2G); the same value for every process "
                             "sharing one store")
    parser.add_argument("--no-client-retention", action="store_true",
                        help="at a client tool pause, publish and free the turn's KV as before, instead of "
                             "letting the retention policy keep, offload or drop it")
    from specrelay.services.verifier.relay_hooks import add_relay_options

    add_relay_options(parser)


def main(args: argparse.Namespace) -> int:
    from specrelay.services.kvstore.service import parse_bytes
    from specrelay.services.verifier.relay_hooks import relay_config
    from specrelay.shared.errors import ConfigError

    if not args.redis:
        raise ConfigError("a stand-alone verifier needs --redis URL (or SPECRELAY_REDIS)")
    cfg = VerifierConfig(args.model, args.redis, speculate=not args.no_speculate, max_nodes=args.max_nodes,
                         num_blocks=args.num_blocks, device=args.device, kvstore=args.kvstore,
                         kvstore_capacity_bytes=parse_bytes(args.kv_capacity), relay=relay_config(args),
                         pte_profile=args.pte_profile, client_retention=not args.no_client_retention)
    logging.basicConfig(level=logging.INFO)

    async def go():
        async with make_bus(cfg.redis) as bus:
            await VerifierService(cfg, bus).run()

    asyncio.run(go())
    return 0
