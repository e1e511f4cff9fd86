"""`--workload slo-mix`: traffic whose SLOs differ in kind, so that the order a scheduler serves it in matters.

The kinds are JITServe's (Zhang et al., NSDI '26, §1): latency-sensitive streaming chat held to per-token latency,
deadline-sensitive requests whose full response must arrive quickly because it triggers a tool, and compound
requests whose deadline spans several dependent calls; plus batch work with no deadline, which a scheduler may
defer. Shares, SLOs and lengths (a lognormal per length, clipped; prompts in words, ~1.02 SmolLM2 tokens each):

| kind | share | class | SLO | prompt words: median, σ, clip | max_tokens per call: median, σ, clip |
|---|---|---|---|---|---|
| stream-chat | 40% | interactive | TTFT and TPOT: the interactive targets | 46, 0.9, 8–600 | 168, 0.7, 16–512 |
| tool-call | 20% | deadline | the whole response by 1.5 × pace(max_tokens) | 60, 0.5, 15–300 | 48, 0.4, 16–128 |
| agent-chain | 15% | deadline | chain by 2 × Σ pace(planned calls) + 3 s a pause | 40, 0.6, 10–200 | 96, 0.5, 24–256 |
| batch | 25% | batch | none (the batch class's targets, none by default) | 500, 0.5, 100–900 | 256, 0.5, 64–512 |

pace(n) = TTFT + n × TPOT, with the interactive class's targets (`--slo interactive:ttft=…,tpot=…`): a tool call's
deadline is what a streamed answer of its length meeting those targets would take, with 50% slack, so one pace sets
every kind's tightness and a deadline scales with the work it covers (a fixed budget would be loose for short
calls and impossible for long ones; `deadline:e2e` is not used here). An agent chain plans 2–4 tool steps, so 3–5
calls (the agentic loop: client-side tools with lognormal pauses, or an observation handed back to a model that
calls none); 3 s covers a pause to about run_python's 90th percentile (median 1.2 s, σ 0.7).

Where the lengths come from: stream-chat's medians make the lognormal means equal LMSYS-Chat-1M's per-turn means
(Zheng et al., 2023, Table 1: 69.5 prompt and 214.5 response tokens; mean = median·e^(σ²/2)); the σ are ours. The
other kinds' lengths are ours: a tool call is a short function call after a short instruction, an agent step a
short thought, batch work a summary of a document, clipped so that prompt and output fit a 2,048-token context.
max_tokens is a cap: a model that stops earlier makes the request shorter.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from specrelay.loadgen.workloads import TaskSpec, words
from specrelay.shared.slo import DEFAULT_SLOS, Slo


@dataclass(frozen=True)
class LogNormal:
    median: float
    sigma: float
    lo: int
    hi: int

    def draw(self, rng: random.Random) -> int:
        return min(self.hi, max(self.lo, round(rng.lognormvariate(math.log(self.median), self.sigma))))


@dataclass(frozen=True)
class Kind:
    share: float
    slo_class: str
    prompt_words: LogNormal
    max_tokens: LogNormal


KINDS = {
    "stream-chat": Kind(0.40, "interactive", LogNormal(46, 0.9, 8, 600), LogNormal(168, 0.7, 16, 512)),
    "tool-call": Kind(0.20, "deadline", LogNormal(60, 0.5, 15, 300), LogNormal(48, 0.4, 16, 128)),
    "agent-chain": Kind(0.15, "deadline", LogNormal(40, 0.6, 10, 200), LogNormal(96, 0.5, 24, 256)),
    "batch": Kind(0.25, "batch", LogNormal(500, 0.5, 100, 900), LogNormal(256, 0.5, 64, 512)),
}
TOOL_CALLER_SYSTEM = (
    "You are a function-calling assistant. When the request needs a fact or a computation, answer with exactly one "
    "call to one of the tools, its arguments filled in; otherwise answer in one sentence."
)
PROMPTS = {  # the topic's words go in the braces
    "stream-chat": "Answer: {}?",
    "tool-call": "Look this up with a tool: {}.",
    "agent-chain": "Find out and report: {}.",
    "batch": "Summarise this document in detail:\n\n{}",
}
TOOL_SLACK = 1.5  # a tool call's deadline: 1.5 x pace(max_tokens)
CHAIN_SLACK = 2.0  # an agent chain's: 2 x the pace of every planned call, plus the pause budget
AGENT_STEPS = (2, 4)  # planned tool steps of an agent chain, uniform
PAUSE_BUDGET_MS = 3000.0  # per planned tool pause in an agent chain's deadline


def pace_ms(slos: dict[str, Slo], num_tokens: int) -> float:
    """TTFT + n x TPOT at the interactive targets: how long a streamed answer of n tokens may take."""
    interactive, default = slos["interactive"], DEFAULT_SLOS["interactive"]
    ttft = interactive.ttft_ms if interactive.ttft_ms is not None else default.ttft_ms
    tpot = interactive.tpot_ms if interactive.tpot_ms is not None else default.tpot_ms
    return ttft + num_tokens * tpot  # type: ignore[operator]


def make_slo_mix_task(index: int, seed: int, slos: dict[str, Slo]) -> TaskSpec:
    rng = random.Random(f"{seed}:{index}:slo-mix")
    names = list(KINDS)
    name = rng.choices(names, weights=[KINDS[n].share for n in names])[0]
    kind = KINDS[name]
    tid = f"{name}-{index:06d}"
    task_seed = rng.getrandbits(32)
    max_tokens = kind.max_tokens.draw(rng)
    prompt = PROMPTS[name].format(words(rng, kind.prompt_words.draw(rng)))
    if name == "stream-chat":
        return TaskSpec(tid, name, kind.slo_class, task_seed, prompt, max_tokens, slos["interactive"],
                        slos["interactive"].e2e_ms)
    if name == "tool-call":
        deadline = TOOL_SLACK * pace_ms(slos, max_tokens)
        return TaskSpec(tid, name, kind.slo_class, task_seed, prompt, max_tokens,
                        Slo(), deadline)
    if name == "agent-chain":
        steps = rng.randint(*AGENT_STEPS)
        calls = steps + 1  # one call per planned step, then the answer
        deadline = CHAIN_SLACK * calls * pace_ms(slos, max_tokens) + steps * PAUSE_BUDGET_MS
        return TaskSpec(tid, name, kind.slo_class, task_seed, prompt, max_tokens, Slo(),
                        deadline, planned_steps=steps)
    return TaskSpec(tid, name, kind.slo_class, task_seed, prompt,
                    max_tokens, slos["batch"], slos["batch"].e2e_ms)
