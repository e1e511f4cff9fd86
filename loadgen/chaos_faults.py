"""The faults of `specrelay chaos`, one scenario each, and what each does to the requests in flight.

Every scenario runs the same way: send its requests, wait until each is streaming, inject the fault, and from that
moment time two things side by side — until a fresh request succeeds (recovery as a user sees it) and until every
service is ready again (each HTTP service answers /health, each worker is back in its consumer group). Killed
services are restarted by the stack's supervisor, as compose's `restart: unless-stopped` would; any other exit is
a crash and is counted.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import aiohttp

from specrelay.loadgen.chaos_check import Comparison, Reference, compare
from specrelay.loadgen.chaos_client import Outcome, completion_body, stream_completion
from specrelay.loadgen.chaos_topology import BUS_PREFIX, Exit, Stack
from specrelay.shared.redis_keys import work_stream

# What a request may end as and still be right: a normal one completes; a poison one completes or is refused
# (4xx); one caught in a Redis outage completes or fails cleanly (an error, never a hang).
COMPLETE, COMPLETE_OR_REFUSE, COMPLETE_OR_FAIL = "complete", "complete-or-4xx", "complete-or-fail"
PROBE_MAX_TOKENS = 8
PROBE_TIMEOUT_S = 20.0
POLL_S = 0.1
READY_POLL_S = 0.25  # each look asks every HTTP service for /health: not so often that their logs fill with it


@dataclass(frozen=True)
class Plan:
    num_requests: int  # normal requests in flight per scenario
    max_tokens: int
    long_requests: int
    long_tokens: int
    request_timeout_s: float  # a request still open this long is a hang
    redis_down_s: float  # how long Redis stays down before it starts again on its port
    recover_within_s: float  # the Redis restart criterion
    settle_timeout_s: float  # how long to wait for a fresh request / every service after a fault
    claim_timeout_s: float  # the bus's: a message idle this long is taken over (the long request must outlast it)


@dataclass(frozen=True)
class Req:
    label: str
    reference: str  # key of its Reference
    body: dict[str, Any] | bytes
    expect: str = COMPLETE


@dataclass
class Context:
    stack: Stack
    session: aiohttp.ClientSession
    model: str  # the served model name
    references: dict[str, Reference]
    tokenizer: Any
    plan: Plan

    def normal(self, label: str, key: str, **extra: Any) -> Req:
        ref = self.references[key]
        return Req(label, key, completion_body(self.model, ref.prompt_ids, ref.max_tokens, **extra))


@dataclass
class Result:
    name: str
    fault: str
    outcomes: list[tuple[Req, Outcome, Comparison]] = field(default_factory=list)
    recover_s: float | None = None  # fault -> a fresh request succeeded (None: not within settle_timeout_s)
    ready_s: float | None = None  # fault -> every service ready again
    not_ready: list[str] = field(default_factory=list)  # services still not ready when we stopped waiting
    crashes: list[Exit] = field(default_factory=list)  # exits we did not cause
    failures: list[str] = field(default_factory=list)  # the acceptance criteria this scenario missed

    @property
    def sent(self) -> int:
        return len(self.outcomes)

    @property
    def completed(self) -> int:
        return sum(o.ok for _, o, _ in self.outcomes)

    @property
    def refused(self) -> int:
        return sum(o.refused for _, o, _ in self.outcomes)

    @property
    def failed(self) -> int:
        return sum(not o.ok and not o.refused for _, o, _ in self.outcomes)

    @property
    def hung(self) -> int:
        return sum(o.timed_out for _, o, _ in self.outcomes)

    @property
    def equal(self) -> int:
        return sum(bool(o.ok and c.equal) for _, o, c in self.outcomes)

    @property
    def duplicated_tokens(self) -> int:
        return sum(c.duplicated_tokens for _, _, c in self.outcomes)

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "fault": self.fault, "sent": self.sent, "completed": self.completed,
                "failed": self.failed, "refused": self.refused, "hung": self.hung, "equal_to_reference": self.equal,
                "duplicated_tokens": self.duplicated_tokens,
                "recover_s": None if self.recover_s is None else round(self.recover_s, 2),
                "ready_s": None if self.ready_s is None else round(self.ready_s, 2), "not_ready": self.not_ready,
                "crashes": [f"{e.name}: {e.how}" for e in self.crashes], "passed": not self.failures,
                "failures": self.failures,
                "requests": [{**o.as_json(), "expect": r.expect,
                              "equal": c.equal, "duplicated_tokens": c.duplicated_tokens,
                              "diverged_at": c.diverged_at} for r, o, c in self.outcomes]}


# --- the scenarios -----------------------------------------------------------------------------------------------

def normals(ctx: Context, tag: str) -> list[Req]:
    keys = [k for k in ctx.references if k.startswith("p")][:ctx.plan.num_requests]
    return [ctx.normal(f"{tag}-{k}", k) for k in keys]


async def baseline(ctx: Context) -> Result:
    return await run_scenario(ctx, "baseline", "none: the stack as started", normals(ctx, "base"), None)


async def kill_drafter(ctx: Context) -> Result:
    return await run_scenario(ctx, "drafter kill", "kill -9 the drafter mid-stream; restarted",
                              normals(ctx, "drafter"), lambda: _kill(ctx, "drafter"))


async def kill_verifier(ctx: Context) -> Result:
    killed: list[str] = []

    async def fault() -> None:
        name, serving = await asyncio.to_thread(busiest_verifier, ctx.stack)
        ctx.stack.kill(name)
        killed.append(f"{name}, serving {serving}")

    result = await run_scenario(ctx, "verifier kill", "kill -9 the verifier replica serving the most requests "
                                "mid-stream; restarted", normals(ctx, "verifier"), fault)
    result.fault += f" ({killed[0]})" if killed else ""
    return result


def busiest_verifier(stack: Stack) -> tuple[str, int]:
    """The replica with the most Generates pending on it (a replica holds each one it serves until it finishes),
    so the kill lands on work in flight; with how many."""
    import redis

    client = redis.Redis.from_url(stack.redis_url, socket_timeout=2, socket_connect_timeout=2)
    try:
        pending = client.xpending_range(work_stream(BUS_PREFIX, "verifier.generate"), "verifier", "-", "+", 1000)
    finally:
        client.close()
    serving = {name: 0 for name, run in stack.running.items() if run.spec.service == "verifier"}
    for entry in pending:
        consumer = entry["consumer"].decode(errors="replace")
        for name in serving:
            if consumer.endswith(f"-{stack.running[name].popen.pid}"):
                serving[name] += 1
    name = max(serving, key=lambda n: serving[n])
    return name, serving[name]


async def kill_kvstore(ctx: Context) -> Result:
    return await run_scenario(ctx, "kvstore kill", "kill -9 the kvstore mid-stream; restarted",
                              normals(ctx, "kvstore"), lambda: _kill(ctx, "kvstore"))


async def restart_redis(ctx: Context) -> Result:
    async def fault() -> None:
        ctx.stack.kill_redis()
        await asyncio.sleep(ctx.plan.redis_down_s)
        await asyncio.to_thread(ctx.stack.start_redis)

    reqs = [Req(r.label, r.reference, r.body, COMPLETE_OR_FAIL) for r in normals(ctx, "redis")]
    result = await run_scenario(ctx, "redis restart", f"kill -9 Redis mid-stream, start it again on its port "
                                f"after {ctx.plan.redis_down_s:g}s (its data gone)", reqs, fault)
    limit = ctx.plan.recover_within_s
    if result.recover_s is None or result.recover_s > limit:
        result.failures.append(f"no fresh request succeeded within {limit:g}s of the fault "
                               f"({_when(result.recover_s)})")
    if result.ready_s is None or result.ready_s > limit:
        late = f"; never: {', '.join(result.not_ready)}" if result.not_ready else ""
        result.failures.append(f"not every service was ready again within {limit:g}s ({_when(result.ready_s)}{late})")
    return result


async def long_request(ctx: Context) -> Result:
    reqs = [ctx.normal(f"long{i}", "long") for i in range(ctx.plan.long_requests)]
    result = await run_scenario(ctx, "long request", f"{ctx.plan.long_tokens}-token requests "
                                f"(x{ctx.plan.long_requests}) past the {ctx.plan.claim_timeout_s:g}s claim timeout",
                                reqs, None)
    longest = max((o.duration_s for _, o, _ in result.outcomes), default=0.0)
    if longest <= ctx.plan.claim_timeout_s:
        result.failures.append(f"not exercised: the longest request ran {longest:.1f}s, within the "
                               f"{ctx.plan.claim_timeout_s:g}s claim timeout (ask for more --long-tokens)")
    return result


async def poison(ctx: Context) -> Result:
    """Inputs that once killed a process (a NaN distribution, integers past 64 bits, deep JSON), sent beside
    normal requests. Each is greedy in effect, so if it is answered it must be answered with the reference."""
    key = next(k for k in ctx.references if k.startswith("p"))
    ref = ctx.references[key]
    deep = 5000
    nested = (b'{"model": ' + json.dumps(ctx.model).encode() + b', "prompt": ' + json.dumps(ref.prompt_ids).encode()
              + b', "max_tokens": %d, "temperature": 0, "stream": true, "user_data": ' % ref.max_tokens
              + b"[" * deep + b"]" * deep + b"}")
    poisons = [ctx.normal("poison:temperature=1e-40", key, temperature=1e-40),
               ctx.normal("poison:temperature=1e-40,seed=1", key, temperature=1e-40, seed=1),
               ctx.normal("poison:seed=2**70", key, seed=2 ** 70),
               ctx.normal("poison:top_k=2**70", key, top_k=2 ** 70),
               Req(f"poison:json-depth={deep}", key, nested)]
    reqs = [Req(p.label, p.reference, p.body, COMPLETE_OR_REFUSE) for p in poisons] + normals(ctx, "beside")
    return await run_scenario(ctx, "poison input", "temperature 1e-40, seed and top_k of 2**70, JSON nested "
                              f"{deep} deep, beside normal requests", reqs, None)


SCENARIOS: dict[str, Callable[[Context], Awaitable[Result]]] = {
    "drafter": kill_drafter, "verifier": kill_verifier, "kvstore": kill_kvstore, "redis": restart_redis,
    "long": long_request, "poison": poison,
}


def _when(seconds: float | None) -> str:
    return "never" if seconds is None else f"after {seconds:.1f}s"


async def _kill(ctx: Context, name: str) -> None:
    ctx.stack.kill(name)


# --- running one -------------------------------------------------------------------------------------------------

async def run_scenario(ctx: Context, name: str, fault_text: str, reqs: list[Req],
                       fault: Callable[[], Awaitable[None]] | None) -> Result:
    stack, plan = ctx.stack, ctx.plan
    num_exits = len(stack.exits)
    outcomes = [Outcome(r.label) for r in reqs]
    tasks = [asyncio.create_task(stream_completion(ctx.session, stack.url, r.body, plan.request_timeout_s, o))
             for r, o in zip(reqs, outcomes)]
    if fault is not None:
        await _until_streaming(outcomes, tasks, plan.request_timeout_s)
    t_fault = time.monotonic()
    if fault is not None:
        await fault()
    recover = asyncio.create_task(_until_fresh_request(ctx, t_fault))
    ready = asyncio.create_task(until_ready(stack, t_fault, plan.settle_timeout_s))
    done = await asyncio.gather(*tasks)
    ready_s, not_ready = await ready
    result = Result(name, fault_text, recover_s=await recover, ready_s=ready_s, not_ready=not_ready)
    for req, out in zip(reqs, done):
        comparison = compare(out.chunks, ctx.references[req.reference].text, ctx.tokenizer)
        result.outcomes.append((req, out, comparison))
    result.crashes = [e for e in stack.exits[num_exits:] if not e.injected]
    result.failures += criteria(result)
    return result


def criteria(result: Result) -> list[str]:
    """What every scenario must show: the acceptance criteria of issue 18, request by request."""
    failures = []
    for req, out, comparison in result.outcomes:
        if out.timed_out:
            failures.append(f"{out.label}: hung (no end after its timeout)")
        elif not out.ok and not (req.expect == COMPLETE_OR_FAIL or (req.expect == COMPLETE_OR_REFUSE and out.refused)):
            failures.append(f"{out.label}: failed ({out.error})")
        if out.ok and not comparison.equal:
            where = "its end" if comparison.diverged_at is None else f"character {comparison.diverged_at}"
            failures.append(f"{out.label}: output differs from the greedy reference at {where}")
        if comparison.duplicated_tokens:
            failures.append(f"{out.label}: {comparison.duplicated_tokens} duplicated token(s)")
    for crash in result.crashes:
        failures.append(f"{crash.name} crashed ({crash.how})")
    if result.recover_s is None:
        failures.append("no fresh request succeeded after the fault")
    return failures


async def _until_streaming(outcomes: list[Outcome], tasks: list[asyncio.Task], timeout_s: float) -> None:
    """Until every request has streamed text or ended: the fault then lands in the middle of each."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all(t.done() or o.chunks for o, t in zip(outcomes, tasks)):
            return
        await asyncio.sleep(POLL_S)


async def _until_fresh_request(ctx: Context, since: float) -> float | None:
    """Seconds from `since` until a fresh short request streams the reference: recovery as a user sees it."""
    ref = ctx.references["probe"]
    body = completion_body(ctx.model, ref.prompt_ids, ref.max_tokens)
    deadline = since + ctx.plan.settle_timeout_s
    while time.monotonic() < deadline:
        timeout = min(PROBE_TIMEOUT_S, max(deadline - time.monotonic(), 0.1))
        out = await stream_completion(ctx.session, ctx.stack.url, body, timeout, Outcome("probe"))
        if out.ok and out.text == ref.text:
            return out.ended_s - since
        await asyncio.sleep(POLL_S * 2)
    return None


async def until_ready(stack: Stack, since: float, timeout_s: float) -> tuple[float | None, list[str]]:
    """Seconds from `since` until every service is ready (each restarted one too), or None and those still not."""
    import redis

    client = redis.Redis.from_url(stack.redis_url, socket_timeout=2, socket_connect_timeout=2)
    try:
        while True:
            waiting = await asyncio.to_thread(stack.not_ready, client)
            if not waiting:
                return time.monotonic() - since, []
            if time.monotonic() >= since + timeout_s:
                return None, waiting
            await asyncio.sleep(READY_POLL_S)
    finally:
        client.close()
