"""Seeded tool-integrated trajectories for `specrelay bench tir`: multi-turn tool loops with pauses of three kinds.

A trajectory is a prompt, then turns: the model decodes `decode_tokens`, calls one tool, the tool pauses for
`pause_s` (on the benchmark's clock), its response of `response_tokens` tokens is appended, and the next turn
starts. The last turn ends with an answer instead of a call. Token ids are drawn at random (the content does not
change the cost of a forward; the lengths do).

Tool kinds, chosen so that every retention choice has a case where it is right:

| kind | pause | response | stands for |
|---|---|---|---|
| calculator | 2–40 ms | 4–40 tokens | a server-fast tool: the KV should stay |
| search | 0.2–2 s | 300–1,500 tokens | a web search or file read: long responses inflate the context |
| human | 3–12 s | 10–120 tokens | a person approving a step: keeping the KV that long blocks others |

Plain Python, no torch: the workload is data.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from specrelay.shared.errors import ConfigError


@dataclass(frozen=True)
class ToolKind:
    name: str
    weight: float  # relative frequency of the kind among calls
    pause_s: tuple[float, float]  # uniform range, seconds on the benchmark clock
    response_tokens: tuple[int, int]  # uniform range


TOOL_KINDS = (
    ToolKind("calculator", 0.35, (0.002, 0.040), (4, 40)),
    ToolKind("search", 0.50, (0.2, 2.0), (300, 1500)),
    ToolKind("human", 0.15, (3.0, 12.0), (10, 120)),
)


@dataclass(frozen=True)
class ToolTurn:
    decode_tokens: int  # generated before the call (the reasoning and the call itself)
    tool: str
    pause_s: float
    response: tuple[int, ...]  # the tool response's tokens, appended to the context after the pause


@dataclass(frozen=True)
class Trajectory:
    trajectory_id: int
    prompt: tuple[int, ...]
    turns: tuple[ToolTurn, ...]  # each ends in a tool call
    answer_tokens: int  # the final turn's decode, after the last tool response

    @property
    def total_tokens(self) -> int:
        """Prompt + generated + tool-response tokens: what a token meter counts (the final context length)."""
        return len(self.prompt) + sum(t.decode_tokens + len(t.response) for t in self.turns) + self.answer_tokens


@dataclass(frozen=True)
class WorkloadConfig:
    num_trajectories: int = 16
    max_turns: int = 6  # tool calls per trajectory: 1 .. max_turns, uniform
    prompt_tokens: tuple[int, int] = (100, 400)
    decode_tokens: tuple[int, int] = (16, 48)  # per turn
    max_context: int = 4000  # a trajectory stops calling tools before its context would pass this
    vocab: tuple[int, int] = (16, 4000)  # token ids drawn from [lo, hi): clear of special ids
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_trajectories < 1 or self.max_turns < 1:
            raise ConfigError("the workload needs at least one trajectory and one tool turn")
        longest_turn = self.decode_tokens[1] + max(k.response_tokens[1] for k in TOOL_KINDS)
        if self.prompt_tokens[1] + longest_turn + self.decode_tokens[1] > self.max_context:
            raise ConfigError(f"max_context {self.max_context} is too small for one tool turn of this workload")


def make_workload(config: WorkloadConfig) -> list[Trajectory]:
    rng = random.Random(config.seed)
    kinds, weights = list(TOOL_KINDS), [k.weight for k in TOOL_KINDS]

    def tokens(n: int) -> tuple[int, ...]:
        return tuple(rng.randrange(*config.vocab) for _ in range(n))

    trajectories = []
    for i in range(config.num_trajectories):
        prompt = tokens(rng.randint(*config.prompt_tokens))
        context = len(prompt)
        turns = []
        for _ in range(rng.randint(1, config.max_turns)):
            kind = rng.choices(kinds, weights)[0]
            decode = rng.randint(*config.decode_tokens)
            response = rng.randint(*kind.response_tokens)
            # Room for this turn and a final answer; a trajectory that would overflow answers now.
            if context + decode + response + config.decode_tokens[1] > config.max_context:
                break
            turns.append(ToolTurn(decode, kind.name, rng.uniform(*kind.pause_s), tokens(response)))
            context += decode + response
        trajectories.append(Trajectory(i, prompt, tuple(turns), rng.randint(*config.decode_tokens)))
    return trajectories
