"""The relay bench's task check: a later agent answers questions whose answers sit in the span it quotes, and a
reuse method passes where its answer is as right as full prefill's.

An upstream "records" agent's output is a list of customer records (name, city, order code) about `span_len`
tokens long; its K/V is computed the way a verifier has it when that agent finishes (its prompt, then the output
fed back through the model: one forward over the output tokens writes the same K/V as decoding them one by one, up
to rounding, and costs one step instead of span_len). A support agent's prompt quotes the records after
instructions of its own and asks for one record's city. Each method prefills that prompt and answers greedily;

    correct  = the answer's text contains the asked city (case-insensitive; token ids without a tokenizer)
    same     = the answer's tokens equal full prefill's

and the bench reports the share correct per method (task accuracy) beside full prefill's, and the share same.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from specrelay.bench.relay_pipeline import Texts, greedy
from specrelay.services.kvstore import KVStore
from specrelay.services.verifier.relay import RelayConfig, capture_span, relay_prefill
from specrelay.services.verifier.relay_index import lookup_relay, publish_span
from specrelay.shared.modeling.kv_cache import BlockTable
from specrelay.shared.modeling.runner import ModelRunner, StepInput

RECORDS = ("You are the records agent.", "List the customer records you hold.")
ASKER = ("You are the support agent.",
         'The records agent wrote:\n"""\n{}\n"""\nIn which city does {name} live? Answer with the city only.')
FIRST = ("Ana", "Liam", "Kofi", "Mei", "Ravi", "Sofia", "Jonas", "Amara", "Pedro", "Yuki", "Omar", "Elena",
         "Tariq", "Ingrid", "Chen", "Lucia", "Marek", "Nadia", "Hugo", "Zara")
LAST = ("Costa", "Berg", "Mensah", "Tanaka", "Patel", "Novak", "Silva", "Okafor", "Larsen", "Moreau", "Haddad",
        "Kim", "Weber", "Rossi", "Duarte", "Ivanova")
CITIES = ("Lisbon", "Oslo", "Accra", "Kyoto", "Madrid", "Prague", "Lima", "Nairobi", "Dublin", "Vienna", "Cairo",
          "Seoul", "Berlin", "Turin", "Porto", "Quito", "Hanoi", "Tunis", "Bergen", "Krakow")
ANSWER_TOKENS = 12


@dataclass
class TaskAnswer:
    correct: bool
    same_as_full: bool
    reuse_rate: float


def records_text(texts: Texts, span_len: int, rng: random.Random) -> tuple[list[int], list[tuple[str, str]]]:
    """Records until the text is about span_len tokens; (token ids, [(name, city)] in order). Names are unique."""
    people = [f"{a} {b}" for a in FIRST for b in LAST]
    rng.shuffle(people)
    lines, facts = [], []
    for name in people:
        city = rng.choice(CITIES)
        line = f"Record {len(lines) + 1}: {name} lives in {city}; order code {rng.randint(1000, 9999)}.\n"
        if lines and len(texts.encode("".join(lines + [line]))) > span_len:
            break
        lines.append(line)
        facts.append((name, city))
    return texts.encode("".join(lines)), facts


def until_stop(texts: Texts, answer: list[int]) -> list[int]:
    """The answer up to its first special token (end of turn): what a user would read."""
    stops = texts.tokenizer.special_ids if texts.tokenizer is not None else frozenset()
    return next((answer[:i] for i, t in enumerate(answer) if t in stops), answer)


def contains(texts: Texts, answer: list[int], truth: str) -> bool:
    if texts.tokenizer is not None:
        return truth.lower() in texts.tokenizer.decode(answer, skip_special_tokens=True).lower()
    want = texts.encode(truth)
    return any(answer[i : i + len(want)] == want for i in range(len(answer) - len(want) + 1))


async def run_task(runner: ModelRunner, store: KVStore, model_id: str, texts: Texts, span_len: int, seed: int,
                   configs: dict[str, RelayConfig], num_questions: int) -> list[dict[str, TaskAnswer]]:
    """One records span, `num_questions` questions about records spread over it; per question, per method."""
    rng = random.Random(seed)
    records, facts = records_text(texts, span_len, rng)
    upstream = texts.chat(RECORDS, [])
    table = BlockTable()
    runner.prefill(table, upstream)
    runner.forward([StepInput(table, records)])  # the records agent's output, fed back as its decode steps do
    await publish_span(store, model_id, capture_span(runner.cache, table, len(upstream), len(upstream) + len(records),
                                                     records, runner.model.inv_freq))
    runner.release(table)
    picks = [round(i * (len(facts) - 1) / max(1, num_questions - 1)) for i in range(num_questions)]
    results = []
    for name, city in (facts[i] for i in picks):
        prompt = texts.chat(ASKER, [records], name=name)
        answers: dict[str, tuple[list[int], float]] = {}
        for method in ("full_prefill", *configs):
            table = BlockTable()
            if method == "full_prefill":
                logits, reuse = runner.prefill(table, prompt), 0.0
            else:
                placed = await lookup_relay(store, model_id, prompt, runner.model.inv_freq,
                                            configs[method].min_span_tokens, device=runner.model.device)
                got = relay_prefill(runner.model, runner.cache, table, prompt, placed, configs[method])
                logits, reuse = got.logits[-1], got.reuse_rate
            with torch.inference_mode():
                answers[method] = (until_stop(texts, greedy(runner, table, logits, ANSWER_TOKENS)[0]), reuse)
            runner.release(table)
        ref = answers["full_prefill"][0]
        results.append({m: TaskAnswer(contains(texts, a, city), a == ref, r) for m, (a, r) in answers.items()})
    return results


def task_scores(answers: list[dict[str, TaskAnswer]]) -> dict[str, dict[str, float]]:
    """Per method: task_accuracy (share correct), task_same (share answering as full prefill), task_questions."""
    return {m: {"task_accuracy": round(sum(a[m].correct for a in answers) / len(answers), 4),
                "task_same": round(sum(a[m].same_as_full for a in answers) / len(answers), 4),
                "task_questions": len(answers)} for m in answers[0]} if answers else {}
