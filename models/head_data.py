"""The draft head's training data: the target's own greedy continuations of the project's kinds of prompt, with
the target's last hidden state at every generated position (EAGLE trains on the target's features and outputs).

Prompts come from their own seeds, apart from the ones `bench spec` measures: tool calls and JSON (agentic),
multi-agent hand-offs quoting earlier output (relay), questions (chat) and edits of a given function (code).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from specrelay.shared.modeling.kv_cache import BlockTable
from specrelay.shared.modeling.runner import ModelRunner, StepInput

CHAT_OPENINGS = ("Tell me about {}.", "Explain {} in a few sentences.", "What should I know about {}?",
                 "Give me three tips on {}.", "Write a short paragraph on {}.", "Why does {} matter?")


@dataclass
class Sequence:
    """A prompt and the target's greedy continuation, run through the target: at index j, features[j] is the
    target's hidden state at the token before tokens[j], and labels[j] the target's greedy choice after tokens[j]
    (-1 where not computed: after the last token)."""

    features: torch.Tensor  # [n, hidden]
    tokens: list[int]  # [n] the sequence from its second token on
    labels: list[int]  # [n]
    start: int  # position of tokens[0]

    def windows(self, size: int) -> list[Sequence]:
        return [Sequence(self.features[i : i + size], self.tokens[i : i + size], self.labels[i : i + size],
                         self.start + i) for i in range(0, len(self.tokens), size) if len(self.tokens) - i >= 3]


def training_prompts(tokenizer, num_prompts: int, seed: int = 1000) -> list[list[int]]:
    """A mix of the four workload kinds, from seeds the benchmark does not use."""
    from specrelay.models.corpus import PythonSource, _plan, tool_prompts
    from specrelay.models.tools_catalog import NAMES, TOPICS

    r = random.Random(seed)
    tools = iter(tool_prompts(seed=seed, num_prompts=num_prompts))
    source = PythonSource("train")
    prompts = []
    for i in range(num_prompts):
        kind = i % 4
        if kind == 0:
            p = next(tools)
            prompts.append(tokenizer.apply_chat_template(p.messages, tools=p.tools))
            continue
        topic = r.choice(TOPICS)
        if kind == 1:
            messages = [{"role": "user", "content": r.choice(CHAT_OPENINGS).format(topic)}]
        elif kind == 2:
            plan = _plan(r, topic)
            messages = [{"role": "system", "content": "You are the worker agent."},
                        {"role": "user", "content": f"{r.choice(NAMES)}'s planner wrote:\n\"\"\"\n{plan}\n\"\"\"\n"
                                                    "Carry out every step, quoting each one."}]
        else:
            code = source.chunk(r)
            messages = [{"role": "user", "content": "Rewrite this code with clearer names, and return all of it:\n"
                                                    f"```python\n{code}\n```"}]
        prompts.append(tokenizer.apply_chat_template(messages))
    return prompts


@torch.inference_mode()
def generate_with_features(runner: ModelRunner, prompts: list[list[int]], max_tokens: int, stops: set[int],
                           batch: int = 16) -> list[Sequence]:
    """Prefill each prompt keeping every row (its hidden states and the target's greedy choice after each prompt
    token are training data too: prefill makes them cheaply), then greedy generation `batch` prompts at a time."""
    out = []
    for first in range(0, len(prompts), batch):
        group = prompts[first : first + batch]
        tables = [BlockTable() for _ in group]
        feats: list[list[torch.Tensor]] = [[] for _ in group]
        choices: list[list[int]] = [[] for _ in group]
        try:
            for i, p in enumerate(group):
                for c in range(0, len(p), runner.prefill_chunk):
                    chunk = p[c : c + runner.prefill_chunk]
                    [logits], [hidden] = runner.forward_hidden([StepInput(tables[i], chunk,
                                                                          logits_rows=list(range(len(chunk))))])
                    feats[i].append(hidden)
                    choices[i] += logits.argmax(-1).tolist()
            live = [i for i in range(len(group)) if choices[i][-1] not in stops]
            for _ in range(max_tokens - 1):
                if not live:
                    break
                logits, hidden = runner.forward_hidden([StepInput(tables[i], [choices[i][-1]]) for i in live])
                for i, lg, h in zip(live, logits, hidden):
                    feats[i].append(h)
                    choices[i].append(int(lg[-1].argmax()))
                live = [i for i in live if choices[i][-1] not in stops]
        finally:
            for t in tables:
                runner.release(t)
        for p, f, a in zip(group, feats, choices):
            seq = p + a[len(p) - 1 :]  # the prompt, then what the target chose after its last token onwards
            out.append(Sequence(torch.cat(f), seq[1:], a[1:] + [-1], 1))
    return out
