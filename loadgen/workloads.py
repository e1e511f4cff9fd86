"""Workloads: seeded descriptions of tasks (what to ask, how long, which SLO class), before anything is sent.

- chat: one short, latency-sensitive turn (class `interactive`: TTFT and TPOT).
- agentic: a tool-calling loop with client-side tools and simulated tool pauses (each step `interactive`: the
  agent waits on it, and a step after a pause is where kept or lost KV shows in TTFT).
- relay: planner -> workers -> reviewer; each later prompt quotes earlier outputs verbatim (class `deadline`: the
  pipeline has one end-to-end budget, each call is sent the part of it that is left).
- research: one long output by a deadline (class `deadline`).
- mixed: a seeded draw from the four, the traffic the sweep compares schedulers on.
- slo-mix: streaming chat, tool-triggering deadline calls, agent chains under one deadline and batch work, with
  lognormal lengths (slo_mix.py).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from specrelay.shared.errors import ConfigError
from specrelay.shared.slo import Slo

WORKLOADS = ("chat", "agentic", "relay", "research", "mixed", "slo-mix")
MIX_WEIGHTS = {"chat": 0.4, "agentic": 0.25, "relay": 0.15, "research": 0.2}
SLO_CLASS_OF = {"chat": "interactive", "agentic": "interactive", "relay": "deadline", "research": "deadline"}

MAX_AGENT_STEPS = 8  # a hard bound on one agentic loop, whatever the model does

_WORDS = (
    "cache token model server request agent tool result plan review queue batch latency memory layer budget "
    "search file python error test deploy config metric graph path index value stream signal window buffer shard "
    "replica kernel tensor vector matrix prefix span draft tree accept reject verify schedule deadline goodput "
    "throughput worker planner reviewer report summary analysis data table column row record field schema "
    "database query join filter sort merge split retry timeout failure recovery monitor alert log trace "
    "network socket packet route gateway proxy client session user account policy limit quota cost price "
    "market trend forecast risk option strategy design module function class method argument return loop branch "
    "the a of to and in for with on by from that this is are was be it as at or an which will can should"
).split()

AGENT_SYSTEM = (
    "You are a careful software agent. Use the tools to find facts before answering. Call one tool at a time, "
    "read its result, and answer briefly once you know enough. Tools: search (web search), run_python (runs a "
    "short script), read_file (reads a file from the repository)."
)

TOOLS = [
    {"type": "function", "function": {
        "name": "search", "description": "Search the web and return the top snippets.",
        "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}},
    {"type": "function", "function": {
        "name": "run_python", "description": "Run a short Python script and return its output.",
        "parameters": {"type": "object", "properties": {"code": {"type": "string"}}, "required": ["code"]}}},
    {"type": "function", "function": {
        "name": "read_file", "description": "Read a text file from the repository.",
        "parameters": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}}},
]


@dataclass(frozen=True)
class ToolProfile:
    """A simulated tool: its pause is lognormal (median, sigma of the log), its result a number of words."""

    median_pause_ms: float
    sigma: float
    result_words: int


TOOL_PROFILES = {
    "search": ToolProfile(median_pause_ms=400.0, sigma=0.5, result_words=150),
    "run_python": ToolProfile(median_pause_ms=1200.0, sigma=0.7, result_words=60),
    "read_file": ToolProfile(median_pause_ms=60.0, sigma=0.3, result_words=250),
}
UNKNOWN_TOOL = ToolProfile(median_pause_ms=300.0, sigma=0.5, result_words=40)


@dataclass(frozen=True)
class TaskSpec:
    trajectory_id: str
    workload: str  # chat | agentic | relay | research, or a kind of slo-mix (mixed resolves to one of these)
    slo_class: str
    seed: int  # everything random inside the task (tool pauses, tool results) comes from this
    prompt: str
    max_tokens: int  # per call
    request_slo: Slo  # the class's per-request targets
    deadline_ms: float | None  # end-to-end budget of the whole trajectory, if its class has one
    planned_steps: int = 1  # agentic: tool steps the agent is expected to take
    num_workers: int = 0  # relay: parallel workers between planner and reviewer


def words(rng: random.Random, count: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(count))


def make_task(workload: str, index: int, seed: int, slos: dict[str, Slo]) -> TaskSpec:
    """The index-th task of a run; the same (workload, index, seed) always gives the same task."""
    if workload not in WORKLOADS:
        raise ConfigError(f"unknown workload {workload!r} (one of {', '.join(WORKLOADS)})")
    if workload == "slo-mix":
        from specrelay.loadgen.slo_mix import make_slo_mix_task  # it builds on this module's TaskSpec

        return make_slo_mix_task(index, seed, slos)
    rng = random.Random(f"{seed}:{index}")
    if workload == "mixed":
        names = list(MIX_WEIGHTS)
        workload = rng.choices(names, weights=[MIX_WEIGHTS[n] for n in names])[0]
    slo_class = SLO_CLASS_OF[workload]
    slo = slos[slo_class]
    tid = f"{workload}-{index:06d}"
    task_seed = rng.getrandbits(32)
    if workload == "chat":
        prompt = f"Answer in two sentences: {words(rng, rng.randint(15, 90))}?"
        return TaskSpec(tid, workload, slo_class, task_seed, prompt, 64, slo, slo.e2e_ms)
    if workload == "agentic":
        prompt = f"Find out and report: {words(rng, rng.randint(20, 60))}."
        return TaskSpec(tid, workload, slo_class, task_seed, prompt, 96, slo, slo.e2e_ms,
                        planned_steps=rng.randint(1, 4))
    if workload == "relay":
        prompt = f"Project goal: {words(rng, rng.randint(30, 80))}."
        return TaskSpec(tid, workload, slo_class, task_seed, prompt, 128, slo, slo.e2e_ms,
                        num_workers=rng.randint(1, 3))
    prompt = (f"Write a detailed research report with sections and evidence on: {words(rng, rng.randint(40, 120))}. "
              "Be thorough.")
    return TaskSpec(tid, workload, slo_class, task_seed, prompt, 512, slo, slo.e2e_ms)
