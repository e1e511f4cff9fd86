"""`specrelay toolcoord`: server-side tools as a service of their own, behind the bus.

Why a process apart from the verifier: model-written Python and HTTP fetches are the riskiest work in the system,
and they take seconds where a decode step takes milliseconds; here they run on their own container, scale on their
own (`--scale toolcoord=N`: one consumer group), and cannot stall or crash a verifier.

Loop: receive a ToolCallRequest -> skip it if its caller has already given up -> run it (`ToolRegistry.call`, which
never raises) -> reply a ToolCallReply -> ack. At most `--max-concurrent` calls run at once. Delivery is
at-least-once: a call whose runner died is run again by another, so tools must tolerate a repeat (the built-ins do:
a calculation, a sandboxed script, an HTTP GET).

Callers use `RemoteTools(bus).call(name, arguments)`, which answers like `ToolRegistry.call`: a ToolResult, an error
result after `timeout_s` rather than an exception.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass

import msgspec

from specrelay.services.toolcoord.tools.base import ToolResult
from specrelay.shared.bus import BusUnavailable
from specrelay.shared.stopping import leave, serve_until_stopped

log = logging.getLogger(__name__)

TOOL_CALLS_STREAM = "toolcoord.calls"
GROUP = "toolcoord"


class ToolCallRequest(msgspec.Struct, frozen=True):
    call_id: str
    name: str
    arguments: str  # a JSON object as text, as the model wrote it
    reply_to: str
    deadline_unix_s: float  # the caller stops waiting then: a call still queued past it is not run


class ToolCallReply(msgspec.Struct, frozen=True):
    call_id: str
    content: str
    is_error: bool
    elapsed_s: float


class RemoteTools:
    """The caller's side: a tool call run by whichever toolcoord process takes it."""

    def __init__(self, bus, timeout_s: float = 30.0):
        self.bus = bus
        self.timeout_s = timeout_s

    async def call(self, name: str, arguments: str) -> ToolResult:
        started = time.monotonic()
        async with self.bus.open_reply_channel(ToolCallReply) as channel:  # open before publishing: no lost reply
            try:
                await self.bus.publish(TOOL_CALLS_STREAM, ToolCallRequest(uuid.uuid4().hex, name, arguments,
                                                                          channel.name, time.time() + self.timeout_s))
                reply = await channel.get(timeout_s=self.timeout_s)
            except (TimeoutError, BusUnavailable):
                reply = None
        if reply is None:
            return ToolResult(f"error: {name} got no answer within {self.timeout_s:g}s", is_error=True,
                              elapsed_s=time.monotonic() - started)
        return ToolResult(reply.content, reply.is_error, reply.elapsed_s)


async def serve_toolcoord(bus, registry, consumer: str, max_concurrent: int = 8) -> None:
    slots = asyncio.Semaphore(max_concurrent)
    running: set[asyncio.Task] = set()

    async def handle(delivery) -> None:
        msg: ToolCallRequest = delivery.msg
        try:
            if time.time() > msg.deadline_unix_s:
                log.info("toolcoord: %s (%s) expired in the queue; not run", msg.call_id, msg.name)
            else:
                result = await registry.call(msg.name, msg.arguments)
                await bus.reply(msg.reply_to, ToolCallReply(msg.call_id, result.content, result.is_error,
                                                            result.elapsed_s))
            await delivery.ack()
        except Exception:  # the bus failed us: the call stays pending and is redelivered once idle
            log.exception("toolcoord: %s (%s) not answered", msg.call_id, msg.name)
            delivery.release()
        finally:
            slots.release()

    try:
        async for delivery in bus.consume(TOOL_CALLS_STREAM, GROUP, consumer, ToolCallRequest):
            await slots.acquire()  # back-pressure: stop reading while every slot is busy
            task = asyncio.create_task(handle(delivery))
            running.add(task)
            task.add_done_callback(running.discard)
    finally:
        for task in list(running):
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        await leave(bus, TOOL_CALLS_STREAM, GROUP, consumer)  # after the cancelled calls: their messages stay pending


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from specrelay.shared.flags import add_redis_argument

    add_redis_argument(parser)
    parser.add_argument("--tools", default=os.environ.get("SPECRELAY_TOOLS") or None, metavar="FILE",
                        help="server-side tools config, TOML or JSON (or SPECRELAY_TOOLS; default: the built-ins)")
    parser.add_argument("--max-concurrent", type=int, default=8, help="tool calls run at once")


@dataclass(frozen=True)
class ToolcoordConfig:
    redis: str  # the bus
    tools: str | None = None  # the registry's config file (TOML/JSON); None: the built-ins
    max_concurrent: int = 8  # tool calls run at once
    consumer: str = f"toolcoord-{socket.gethostname()}-{os.getpid()}"  # unique per container as well as per process

    def __post_init__(self) -> None:
        from specrelay.shared.errors import ConfigError

        if not self.redis:
            raise ConfigError("a stand-alone toolcoord needs --redis URL (or SPECRELAY_REDIS)")
        if isinstance(self.max_concurrent, bool) or not isinstance(self.max_concurrent, int) or self.max_concurrent < 1:
            raise ConfigError(f"--max-concurrent {self.max_concurrent}: must be at least 1")


def build_config(args: argparse.Namespace) -> ToolcoordConfig:
    return ToolcoordConfig(args.redis, args.tools, args.max_concurrent)


def main(args: argparse.Namespace) -> int:
    from specrelay.services.toolcoord.tools.registry import load_registry
    from specrelay.shared.bus import make_bus

    cfg = build_config(args)
    registry = load_registry(cfg.tools)
    logging.basicConfig(level=logging.INFO)

    async def go():
        async with make_bus(cfg.redis) as bus:
            print(f"specrelay toolcoord: {', '.join(registry.tools)} for {TOOL_CALLS_STREAM} as {cfg.consumer}",
                  flush=True)
            await serve_until_stopped(serve_toolcoord(bus, registry, cfg.consumer, cfg.max_concurrent))

    asyncio.run(go())
    return 0
