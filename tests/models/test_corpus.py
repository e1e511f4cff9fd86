"""The generated corpus: fixed by its seed, holds every kind of sample, and its tool calls are well formed."""

from __future__ import annotations

import json
import re

from specrelay.models.corpus import KINDS, PythonSource, generate, tool_prompts
from specrelay.models.evaluate import tool_call_is_valid

TOOLS_BLOCK = re.compile(r"<tools>\n(.*?)\n</tools>", re.DOTALL)


def test_a_seed_fixes_the_corpus_and_another_seed_changes_it():
    first = generate(7, "train", 60)
    assert first == generate(7, "train", 60)
    assert generate(7, "train", 20, start=40) == first[40:]
    assert [s.text for s in generate(8, "train", 60)] != [s.text for s in first]
    assert [s.text for s in generate(7, "val", 60)] != [s.text for s in first]


def test_every_kind_of_sample_is_present():
    samples = generate(0, "train", 300)
    assert {s.kind for s in samples} == set(KINDS)
    texts = {kind: [s.text for s in samples if s.kind == kind] for kind in KINDS}
    assert all("<tool_call>" in t and "<tool_response>" in t and "<tools>" in t for t in texts["tool"])
    assert any(re.search(r"\d+ [-+*] \d+ = -?\d+", t) for t in texts["arith"])
    assert all(t.startswith("# ") and t.split("\n", 1)[0].endswith(".py") for t in texts["python"])
    assert all(json.loads(t.split("<|im_start|>assistant\n")[1].split("<|im_end|>")[0]) for t in texts["json"])


def test_tool_calls_in_dialogues_are_valid_for_the_offered_tools():
    for sample in generate(3, "train", 200):
        if sample.kind != "tool":
            continue
        tools = [json.loads(line) for line in TOOLS_BLOCK.search(sample.text).group(1).splitlines()]
        for turn in sample.text.split("<|im_start|>assistant\n")[1:]:
            if turn.startswith("<tool_call>"):
                assert tool_call_is_valid(turn, tools), turn


def test_handoffs_quote_the_earlier_agent_verbatim():
    handoffs = [s.text for s in generate(0, "train", 200) if s.kind == "handoff"]
    assert handoffs
    for text in handoffs:
        planner, worker, reviewer = text.split("<|endoftext|>")
        plan = planner.split("<|im_start|>assistant\n")[1].split("<|im_end|>")[0]
        work = worker.split("<|im_start|>assistant\n")[1].split("<|im_end|>")[0]
        assert f'"""\n{plan}\n"""' in worker
        assert f'"""\n{work}\n"""' in reviewer


def test_held_out_python_files_are_never_trained_on():
    train, val = PythonSource("train"), PythonSource("val")
    assert train.files and val.files
    assert not set(train.files) & set(val.files)


def test_tool_prompts_ask_for_an_offered_tool():
    prompts = tool_prompts(0, 30)
    assert prompts == tool_prompts(0, 30)
    for prompt in prompts:
        assert prompt.messages[-1]["role"] == "user"
        assert 2 <= len(prompt.tools) <= 7
        call = json.dumps({"name": prompt.expected[0]["name"], "arguments": prompt.expected[0]["arguments"]})
        assert tool_call_is_valid(f"<tool_call>\n{call}\n</tool_call>", prompt.tools)
