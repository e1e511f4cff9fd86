"""Playing a task against the server: the calls of each workload, in order, with the client playing the tools.

Every call becomes a RequestRecord the moment it finishes; the task becomes one TrajectoryRecord. A failed call
ends its trajectory (a pipeline stage or agent step cannot go on without its input) and is counted, never raised.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Protocol

from specrelay.loadgen.client import ChatRequest, ChatResult
from specrelay.loadgen.records import RequestRecord, TrajectoryRecord
from specrelay.loadgen.slo_mix import TOOL_CALLER_SYSTEM
from specrelay.loadgen.workloads import (
    AGENT_SYSTEM, MAX_AGENT_STEPS, TOOL_PROFILES, TOOLS, UNKNOWN_TOOL, TaskSpec, words,
)
from specrelay.shared.slo import Slo


class ChatClient(Protocol):
    async def chat(self, req: ChatRequest) -> ChatResult: ...


@dataclass
class PlayContext:
    client: ChatClient
    run_start: float  # time.perf_counter() when the run started
    on_request: Callable[[RequestRecord], None]
    tool_pause_scale: float = 1.0  # multiplies every simulated pause (tests shrink it)
    temperature: float = 0.0


@dataclass
class _Trajectory:
    task: TaskSpec
    ctx: PlayContext
    start: float = field(default_factory=time.perf_counter)
    records: list[RequestRecord] = field(default_factory=list)
    num_calls: int = 0  # calls started (parallel relay workers start before any of them is recorded)
    num_tool_pauses: int = 0
    tool_pause_ms: float = 0.0

    def remaining_ms(self) -> float | None:
        if self.task.deadline_ms is None:
            return None
        return max(1.0, self.task.deadline_ms - (time.perf_counter() - self.start) * 1000.0)

    async def call(self, agent: str, messages: list[dict[str, Any]], *, tools: bool = False) -> ChatResult:
        task, ctx = self.task, self.ctx
        deadline_ms = self.remaining_ms()
        slo = task.request_slo
        if task.slo_class == "deadline" and deadline_ms is not None:
            # A deadline call meets its SLO when it finishes within the budget it was sent.
            slo = Slo(ttft_ms=slo.ttft_ms, tpot_ms=slo.tpot_ms, e2e_ms=deadline_ms)
        req = ChatRequest(messages=messages, max_tokens=task.max_tokens, slo_class=task.slo_class,
                          deadline_ms=deadline_ms, tools=TOOLS if tools else None,
                          temperature=ctx.temperature, seed=task.seed % 2**31)
        turn, self.num_calls = self.num_calls, self.num_calls + 1
        start_s = time.perf_counter() - ctx.run_start
        result = await ctx.client.chat(req)
        pte, pte_detail = result.pte
        record = RequestRecord(
            request_id=f"{task.trajectory_id}-{turn}", trajectory_id=task.trajectory_id, turn=turn, agent=agent,
            workload=task.workload, slo_class=task.slo_class, start_s=start_s, ok=result.ok, error=result.error,
            http_status=result.http_status, ttft_ms=result.ttft_ms, e2e_ms=result.e2e_ms, tpot_ms=result.tpot_ms,
            itl_ms=result.itl_ms, prompt_tokens=result.usage.get("prompt_tokens"),
            completion_tokens=result.completion_tokens, usage_reported=result.stream.usage is not None,
            finish_reason=result.stream.finish_reason, num_tool_calls=len(result.stream.tool_calls),
            deadline_ms=deadline_ms, slo_ttft_ms=slo.ttft_ms, slo_tpot_ms=slo.tpot_ms, slo_e2e_ms=slo.e2e_ms,
            pte=pte, pte_detail=pte_detail,
        )
        self.records.append(record)
        ctx.on_request(record)
        return result

    async def pause(self, tool_names: list[str], rng: random.Random) -> None:
        """Tools of one step run concurrently on the client, so the step pauses for the slowest."""
        pauses = [_pause_ms(TOOL_PROFILES.get(n, UNKNOWN_TOOL), rng) for n in tool_names]
        pause_ms = max(pauses) * self.ctx.tool_pause_scale
        self.num_tool_pauses += 1
        self.tool_pause_ms += pause_ms
        await asyncio.sleep(pause_ms / 1000.0)

    def finish(self) -> TrajectoryRecord:
        ptes = [r.pte for r in self.records]
        details = [r.pte_detail for r in self.records]
        pte_detail = None
        if details and all(d is not None for d in details):
            keys = set.intersection(*(set(d) for d in details))  # type: ignore[arg-type]
            pte_detail = {k: sum(d[k] for d in details) for k in sorted(keys)}  # type: ignore[index]
        return TrajectoryRecord(
            trajectory_id=self.task.trajectory_id, workload=self.task.workload, slo_class=self.task.slo_class,
            start_s=self.start - self.ctx.run_start, e2e_ms=(time.perf_counter() - self.start) * 1000.0,
            num_requests=len(self.records), num_failed=sum(not r.ok for r in self.records),
            num_tool_pauses=self.num_tool_pauses, tool_pause_ms=self.tool_pause_ms,
            completion_tokens=sum(r.completion_tokens for r in self.records), deadline_ms=self.task.deadline_ms,
            pte=sum(ptes) if ptes and all(p is not None for p in ptes) else None,  # type: ignore[misc]
            pte_detail=pte_detail,
        )


def _pause_ms(profile, rng: random.Random) -> float:
    return rng.lognormvariate(math.log(profile.median_pause_ms), profile.sigma)


def _tool_result(name: str, rng: random.Random) -> str:
    profile = TOOL_PROFILES.get(name, UNKNOWN_TOOL)
    return json.dumps({"tool": name, "output": words(rng, profile.result_words)})


async def _chat(t: _Trajectory) -> None:
    await t.call("chat", [{"role": "user", "content": t.task.prompt}])


async def _research(t: _Trajectory) -> None:
    await t.call("researcher", [{"role": "user", "content": t.task.prompt}])


async def _agentic(t: _Trajectory) -> None:
    rng = random.Random(t.task.seed)
    messages: list[dict[str, Any]] = [{"role": "system", "content": AGENT_SYSTEM},
                                      {"role": "user", "content": t.task.prompt}]
    steps = 0
    for _ in range(MAX_AGENT_STEPS):
        result = await t.call("agent", messages, tools=True)
        if not result.ok or len(t.records) == MAX_AGENT_STEPS:
            return
        stream = result.stream
        if stream.finish_reason == "tool_calls" and stream.tool_calls:
            calls = [stream.tool_calls[i] for i in sorted(stream.tool_calls)]
            messages.append(stream.assistant_message())
            await t.pause([c.name for c in calls], rng)
            messages += [{"role": "tool", "tool_call_id": c.id, "content": _tool_result(c.name, rng)} for c in calls]
        elif steps < t.task.planned_steps:
            # The model answered without calling a tool before the task's planned steps were used: the simulated
            # environment hands back an observation as a user turn after a tool-like pause, so that agent traffic
            # keeps its pause-and-resume shape against models that never emit tool calls.
            name = rng.choice(list(TOOL_PROFILES))
            messages.append(stream.assistant_message())
            await t.pause([name], rng)
            messages.append({"role": "user", "content": f"Observation from {name}: {_tool_result(name, rng)}"})
        else:
            return
        steps += 1


async def _relay(t: _Trajectory) -> None:
    goal = t.task.prompt
    plan = await t.call("planner", [
        {"role": "system", "content": "You are the planner. Split the goal into short numbered steps."},
        {"role": "user", "content": goal}])
    if not plan.ok:
        return
    plan_text = plan.stream.content

    async def work(i: int) -> ChatResult:
        return await t.call(f"worker-{i + 1}", [
            {"role": "system", "content": f"You are worker {i + 1}. Do exactly your step and report the result."},
            {"role": "user", "content": f"{goal}\n\nThe plan:\n{plan_text}\n\nCarry out step {i + 1}."}])

    reports = await asyncio.gather(*(work(i) for i in range(t.task.num_workers)))
    if not all(r.ok for r in reports):
        return
    quoted = "".join(f"Worker {i + 1} reported:\n{r.stream.content}\n\n" for i, r in enumerate(reports))
    await t.call("reviewer", [
        {"role": "system", "content": "You are the reviewer. Check the work against the plan and list problems."},
        {"role": "user", "content": f"{goal}\n\nThe plan:\n{plan_text}\n\n{quoted}Review the work."}])


async def _tool_call(t: _Trajectory) -> None:
    # One call with the tools offered: its whole response is what triggers the tool, so its deadline is on E2E.
    await t.call("tool-caller", [{"role": "system", "content": TOOL_CALLER_SYSTEM},
                                 {"role": "user", "content": t.task.prompt}], tools=True)


async def _batch(t: _Trajectory) -> None:
    await t.call("batch", [{"role": "user", "content": t.task.prompt}])


_PLAYERS: dict[str, Callable[[_Trajectory], Awaitable[None]]] = {
    "chat": _chat, "agentic": _agentic, "relay": _relay, "research": _research,
    # slo-mix's kinds (slo_mix.py): the agent chain is the agentic loop under one deadline
    "stream-chat": _chat, "tool-call": _tool_call, "agent-chain": _agentic, "batch": _batch,
}


async def play(task: TaskSpec, ctx: PlayContext, start: float | None = None) -> TrajectoryRecord:
    """`start`: the perf_counter instant the runner decided to start it (default: now)."""
    t = _Trajectory(task, ctx) if start is None else _Trajectory(task, ctx, start=start)
    await _PLAYERS[task.workload](t)
    return t.finish()
