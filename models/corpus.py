"""The generated training corpus: agent dialogues with tools, multi-agent hand-offs, JSON, arithmetic, and Python
source from this machine's standard library. A (seed, split) pair fixes every sample.

Each sample is one document of text, rendered through the same chat template the server uses. The train and val
splits draw from independent random streams; Python files are split by file so val source was never trained on.
"""

from __future__ import annotations

import json
import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from specrelay.models.chat_template import render_chat
from specrelay.models.tools_catalog import CITIES, NAMES, TOOLS, TOOLS_BY_NAME, TOPICS, WORDS, Tool

# Share of samples per kind. Tool dialogues dominate: they are what the tool-call goal measures.
KIND_WEIGHTS: dict[str, float] = {"tool": 0.50, "handoff": 0.14, "json": 0.12, "arith": 0.14, "python": 0.10}
KINDS = tuple(KIND_WEIGHTS)
PERSONAS = ["You are a helpful assistant.", "You are an agent that uses tools to answer.", "Be brief.",
            "You are the operations assistant of a small team.", ""]


@dataclass(frozen=True)
class Sample:
    kind: str
    text: str


@dataclass(frozen=True)
class ToolPrompt:
    """A held-out tool-use prompt: the model must answer it with a valid call to one of `tools`."""
    messages: list[dict]
    tools: list[dict]
    expected: list[dict]  # the reference calls, {"name": ..., "arguments": {...}}, in order


def _rng(seed: int, split: str, index: int) -> random.Random:
    return random.Random(f"{seed}:{split}:{index}")


def _tool_set(r: random.Random, needed: list[Tool]) -> list[dict]:
    """The tools offered in a system turn: the needed ones among a few distractors, in random order."""
    others = [t for t in TOOLS if t not in needed]
    offered = needed + r.sample(others, r.randint(1, 4))
    r.shuffle(offered)
    return [t.schema() for t in offered]


def _call(tool: Tool, args: dict, r: random.Random, call_id: str) -> dict:
    # Arguments arrive both as JSON strings (OpenAI clients) and as dicts; the template renders both alike.
    arguments = json.dumps(args) if r.random() < 0.5 else args
    return {"id": call_id, "type": "function", "function": {"name": tool.name, "arguments": arguments}}


def _tool_opening(r: random.Random) -> tuple[list[dict], list[dict], list[tuple[Tool, dict]]]:
    """System + user turns that need 1 or 2 tool calls, and the calls that answer them."""
    first = r.choice(TOOLS)
    calls = [(first, first.make_args(r))]
    if r.random() < 0.25:  # two calls in one turn: the same tool twice or a second tool
        second = first if r.random() < 0.5 else r.choice(TOOLS)
        calls.append((second, second.make_args(r)))
    asks = [r.choice(t.asks).format(**a) for t, a in calls]
    user = asks[0] if len(asks) == 1 else f"{asks[0]} Also: {asks[1][0].lower()}{asks[1][1:]}"
    persona = r.choice(PERSONAS)
    messages = ([{"role": "system", "content": persona}] if persona else []) + [{"role": "user", "content": user}]
    needed = list({t.name: t for t, _ in calls}.values())
    return messages, _tool_set(r, needed), calls


def tool_dialogue(r: random.Random) -> str:
    messages, tools, calls = _tool_opening(r)
    for turn in range(1 + (r.random() < 0.3)):
        if turn:  # a follow-up question in the same conversation needs another call
            tool = TOOLS_BY_NAME[r.choice(tools)["function"]["name"]]
            calls = [(tool, tool.make_args(r))]
            messages.append({"role": "user", "content": r.choice(tool.asks).format(**calls[0][1])})
        ids = [f"call_{r.randint(0, 99999)}" for _ in calls]
        messages.append({"role": "assistant", "content": None, "tool_calls": [
            _call(t, a, r, i) for (t, a), i in zip(calls, ids)]})
        results = [t.make_result(r, a) for t, a in calls]
        for i, res in zip(ids, results):
            messages.append({"role": "tool", "tool_call_id": i, "content": json.dumps(res)})
        answer = " ".join(t.answer(a, res) for (t, a), res in zip(calls, results))
        messages.append({"role": "assistant", "content": answer})
    return render_chat(messages, tools)


def tool_prompt(r: random.Random) -> ToolPrompt:
    messages, tools, calls = _tool_opening(r)
    return ToolPrompt(messages=messages, tools=tools, expected=[{"name": t.name, "arguments": a} for t, a in calls])


def _plan(r: random.Random, topic: str) -> str:
    steps = r.sample([f"Collect three facts about {topic}.", f"Explain why {topic} matters.",
                      f"List two risks of {topic}.", f"Compare {topic} with {r.choice(TOPICS)}.",
                      f"Write a one-line summary of {topic}.", f"Estimate the cost of {topic} in {r.choice(WORDS)}."],
                     r.randint(2, 4))
    return "Plan:\n" + "\n".join(f"{i + 1}. {s}" for i, s in enumerate(steps))


def _work(r: random.Random, topic: str, plan: str) -> str:
    lines = [line.split(". ", 1)[1] for line in plan.splitlines()[1:]]
    done = [f"- {step} Done: {topic} {r.choice(['shows', 'needs', 'has', 'avoids'])} "
            f"{r.choice(['steady gains', 'careful tuning', 'clear limits', 'low cost', 'more data'])}."
            for step in lines]
    return f"Result for {topic}:\n" + "\n".join(done)


def handoff(r: random.Random) -> str:
    """Planner -> worker -> reviewer: each later agent quotes the earlier agent's output verbatim."""
    topic, lead = r.choice(TOPICS), r.choice(NAMES)
    plan = _plan(r, topic)
    work = _work(r, topic, plan)
    verdict = r.choice(["Approved.", "Approved with one note: cite a source.", "Needs changes: step 2 is vague."])
    planner = [{"role": "system", "content": "You are the planner agent."},
               {"role": "user", "content": f"{lead} asks for a short brief on {topic}. Make a plan."},
               {"role": "assistant", "content": plan}]
    worker = [{"role": "system", "content": "You are the worker agent."},
              {"role": "user", "content": f"The planner wrote:\n\"\"\"\n{plan}\n\"\"\"\nCarry out every step."},
              {"role": "assistant", "content": work}]
    reviewer = [{"role": "system", "content": "You are the reviewer agent."},
                {"role": "user", "content": f"Review the worker's output:\n\"\"\"\n{work}\n\"\"\""},
                {"role": "assistant", "content": f"{verdict} The result covers {topic} for {lead}."}]
    return "<|endoftext|>".join(render_chat(m) for m in (planner, worker, reviewer))


def json_task(r: random.Random) -> str:
    record = {"name": r.choice(NAMES), "age": r.randint(18, 90), "city": r.choice(CITIES), "tags": r.sample(WORDS, r.randint(0, 3)), "active": r.random() < 0.5}
    keys = r.sample(list(record), r.randint(2, len(record)))
    described = ", ".join(f"{k} {record[k] if not isinstance(record[k], list) else ' and '.join(record[k]) or 'none'}"
                          for k in keys)
    obj = {k: record[k] for k in keys}
    indent = r.choice([None, 2])
    ask = r.choice(["Return a JSON object with these fields: {d}.", "As JSON please: {d}", "Encode {d} as JSON."])
    return render_chat([{"role": "user", "content": ask.format(d=described)},
                        {"role": "assistant", "content": json.dumps(obj, indent=indent)}])


def arithmetic(r: random.Random) -> str:
    a, b, c = r.randint(0, 999), r.randint(1, 99), r.randint(1, 20)
    op = r.choice(["+", "-", "*"])
    first = eval(f"{a} {op} {b}", {"__builtins__": {}})
    if r.random() < 0.5:
        q, ans = f"What is {a} {op} {b}?", f"{a} {op} {b} = {first}"
    else:
        op2 = r.choice(["+", "*"])
        second = eval(f"{first} {op2} {c}", {"__builtins__": {}})
        q = f"Compute ({a} {op} {b}) {op2} {c}."
        ans = f"{a} {op} {b} = {first}\n{first} {op2} {c} = {second}\nThe answer is {second}."
    return render_chat([{"role": "user", "content": q}, {"role": "assistant", "content": ans}])


class PythonSource:
    """Chunks of the standard library's .py files on this machine; every tenth file (sorted) is held out."""

    def __init__(self, split: str, max_chars: int = 900):
        root = Path(sysconfig.get_paths()["stdlib"])
        files = sorted(p for p in root.glob("*.py") if p.stat().st_size > 2000)
        self.files = [f for i, f in enumerate(files) if (i % 10 == 0) == (split == "val")]
        self.max_chars = max_chars
        self._cache: dict[Path, list[str]] = {}

    def chunk(self, r: random.Random) -> str:
        path = r.choice(self.files)
        if path not in self._cache:
            self._cache[path] = path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
        lines = self._cache[path]
        start = r.randrange(max(1, len(lines) - 20))
        out, size = [], 0
        for line in lines[start:]:
            if size + len(line) > self.max_chars:
                break
            out.append(line)
            size += len(line)
        return f"# {path.name}\n" + "".join(out)


def generate(seed: int, split: str, num_samples: int, start: int = 0) -> list[Sample]:
    """`num_samples` samples of the split, from position `start` of its stream (so streams can be extended)."""
    source = PythonSource(split)
    makers = {"tool": tool_dialogue, "handoff": handoff, "json": json_task, "arith": arithmetic,
              "python": source.chunk}
    samples = []
    for index in range(start, start + num_samples):
        r = _rng(seed, split, index)
        kind = r.choices(KINDS, weights=[KIND_WEIGHTS[k] for k in KINDS])[0]
        samples.append(Sample(kind, makers[kind](r)))
    return samples


def tool_prompts(seed: int, num_prompts: int) -> list[ToolPrompt]:
    """Held-out tool-use prompts, from their own stream (never part of the training split)."""
    return [tool_prompt(_rng(seed, "tool-eval", i)) for i in range(num_prompts)]
