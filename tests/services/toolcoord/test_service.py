"""`specrelay toolcoord`: server-side tool calls run by a service behind the bus, answered like
`ToolRegistry.call` on the caller's side."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time

import pytest

from specrelay.services.toolcoord.service import (
    TOOL_CALLS_STREAM,
    RemoteTools,
    ToolCallReply,
    ToolCallRequest,
    serve_toolcoord,
)
from specrelay.services.toolcoord.tools.registry import builtin_registry
from specrelay.shared.bus import BusConfig, LocalBus, make_bus


@contextlib.asynccontextmanager
async def running(bus, consumer="toolcoord-test", **kw):
    task = asyncio.create_task(serve_toolcoord(bus, builtin_registry({"python": False}), consumer, **kw))
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_calls_come_back_with_the_tools_answer():
    async with LocalBus() as bus, running(bus):
        tools = RemoteTools(bus, timeout_s=5)
        ok, unknown, bad = await asyncio.gather(
            tools.call("calculator", '{"expression": "2 + 3 * 4"}'),
            tools.call("rm_rf", "{}"),
            tools.call("calculator", "{not json"))
    assert (ok.content, ok.is_error) == ("14", False)
    assert unknown.is_error and "no server-side tool named 'rm_rf'" in unknown.content
    assert bad.is_error and "not valid JSON" in bad.content


async def test_no_toolcoord_is_an_error_answer_after_the_timeout():
    async with LocalBus() as bus:
        started = time.monotonic()
        result = await RemoteTools(bus, timeout_s=0.2).call("calculator", '{"expression": "1"}')
    assert result.is_error and "no answer within 0.2s" in result.content
    assert time.monotonic() - started < 2


async def test_a_call_whose_caller_gave_up_is_not_run():
    async with LocalBus() as bus:
        expired, live = bus.open_reply_channel(ToolCallReply), bus.open_reply_channel(ToolCallReply)
        await bus.publish(TOOL_CALLS_STREAM, ToolCallRequest("late", "calculator", '{"expression": "1"}',
                                                             expired.name, time.time() - 1))
        await bus.publish(TOOL_CALLS_STREAM, ToolCallRequest("now", "calculator", '{"expression": "6 * 7"}',
                                                             live.name, time.time() + 5))
        async with running(bus):
            reply = await live.get(timeout_s=5)
            assert (reply.call_id, reply.content) == ("now", "42")
            with pytest.raises(TimeoutError):
                await expired.get(timeout_s=0.3)


async def test_across_processes_over_redis(redis_url, redis_prefix):
    config = BusConfig(prefix=redis_prefix, block_ms=50)
    async with make_bus(redis_url, config) as service_bus, make_bus(redis_url, config) as caller_bus, \
            running(service_bus, max_concurrent=2):
        results = await asyncio.gather(*(RemoteTools(caller_bus, timeout_s=10).call(
            "calculator", f'{{"expression": "{i} * {i}"}}') for i in range(6)))
    assert [r.content for r in results] == [str(i * i) for i in range(6)]


def test_the_command_needs_redis():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPECRELAY_")}
    out = subprocess.run([sys.executable, "-m", "specrelay", "toolcoord"], capture_output=True, text=True,
                         timeout=60, env=env)
    assert out.returncode == 2 and "needs --redis URL" in out.stderr
