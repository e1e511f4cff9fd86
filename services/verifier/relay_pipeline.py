"""One multi-agent pipeline for the relay benchmark: planner -> worker -> reviewer on one model, each downstream
prompt quoting earlier outputs after its own instructions (never as a prefix), and every reuse method measured on
the same downstream prompts against a full prefill.

The upstream outputs are real decodes: each agent samples its output token by token, and the K/V written by those
decode steps (with that agent's own prefix) is what gets published to the kvstore and relayed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from specrelay.services.kvstore import KVStore
from specrelay.services.verifier.relay import RelayConfig, RelayPrefill, capture_span, relay_prefill
from specrelay.services.verifier.relay_index import lookup_relay, publish_span
from specrelay.shared.modeling.kv_cache import BlockTable
from specrelay.shared.modeling.runner import ModelRunner, StepInput

METHODS = ("full_prefill", "naive_reuse", "cacheblend", "relaycaching")
PLANNER = "You are the planner. Break the task below into numbered steps for a worker.\nTask: "
WORKER = "You are the worker. Here is the plan written by the planner:\n"
WORKER_ASK = "\nCarry out every step of the plan above and show your work."
REVIEWER = "You are the reviewer. The plan was:\n"
REVIEWER_WORK = "\nThe worker wrote:\n"
REVIEWER_ASK = "\nCheck the work against the plan and list every mistake you find."
TASKS = ("summarise the quarterly sales report and flag anomalies", "write a function that merges two sorted lists",
         "plan a three-day trip to the mountains on a small budget", "explain why the build fails on the CI runner")


@dataclass
class Measurement:
    """One method on one downstream prompt."""

    ttft_ms: float
    reuse_rate: float
    greedy_agreement: float  # share of the next greedy tokens equal, position by position, to full prefill's
    greedy_exact: bool  # all of them equal
    mean_kl: float  # KL(full ‖ method) of the next-token distributions at the prompt's last positions


class Texts:
    """Instruction text as token ids: the model's tokenizer when it has one, else fixed random ids."""

    def __init__(self, model_dir, vocab_size: int, banned: set[int]):
        self.tokenizer = None
        self.vocab_size, self.banned = vocab_size, banned
        try:
            from specrelay.shared.tokenizer import Tokenizer

            self.tokenizer = Tokenizer(model_dir)
        except Exception:  # a bare weights directory (random dev models): ids stand in for text
            self.tokenizer = None

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is not None:
            return self.tokenizer.encode(text)
        gen = torch.Generator().manual_seed(sum(map(ord, text)))
        return [int(t) for t in torch.randint(0, self.vocab_size, (max(8, len(text) // 4),), generator=gen)
                if int(t) not in self.banned]


def decode_agent(runner: ModelRunner, prompt: list[int], num_tokens: int, gen: torch.Generator,
                 banned: list[int], temperature: float = 0.8) -> tuple[list[int], BlockTable]:
    """An upstream agent: full prefill, then sampled decode steps (stop tokens masked so the span is exactly
    `num_tokens` long). Every output token is fed back, so its decode-phase K/V is in the returned table."""
    table = BlockTable()
    logits = runner.prefill(table, prompt)
    out: list[int] = []
    for _ in range(num_tokens):
        logits = logits.clone()
        logits[banned] = float("-inf")
        out.append(int(torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=gen)))
        logits = runner.forward([StepInput(table, [out[-1]])])[0][-1]
    return out, table


async def run_pipeline(runner: ModelRunner, store: KVStore, model_id: str, texts: Texts, span_len: int, seed: int,
                       configs: dict[str, RelayConfig], num_greedy: int, num_kl: int, repeats: int,
                       banned: list[int]) -> list[dict[str, Measurement]]:
    """Planner writes `span_len` tokens, the worker span_len // 2; returns the measurements of the worker's and
    the reviewer's prefills."""
    gen = torch.Generator().manual_seed(seed)
    inv_freq = runner.model.inv_freq
    planner_prompt = texts.encode(PLANNER + TASKS[seed % len(TASKS)] + "\n")
    plan, table = decode_agent(runner, planner_prompt, span_len, gen, banned)
    await publish_span(store, model_id, capture_span(runner.cache, table, len(planner_prompt),
                                                     len(planner_prompt) + len(plan), plan, inv_freq))
    runner.release(table)

    worker_prompt = texts.encode(WORKER) + plan + texts.encode(WORKER_ASK)
    work, table = decode_agent(runner, worker_prompt, span_len // 2, gen, banned)
    await publish_span(store, model_id, capture_span(runner.cache, table, len(worker_prompt),
                                                     len(worker_prompt) + len(work), work, inv_freq))
    runner.release(table)

    reviewer_prompt = (texts.encode(REVIEWER) + plan + texts.encode(REVIEWER_WORK) + work
                       + texts.encode(REVIEWER_ASK))
    results = []
    for prompt in (worker_prompt, reviewer_prompt):
        results.append(await measure_prompt(runner, store, model_id, prompt, configs, num_greedy, num_kl,
                                            repeats))
    return results


async def measure_prompt(runner: ModelRunner, store: KVStore, model_id: str, prompt: list[int],
                         configs: dict[str, RelayConfig], num_greedy: int, num_kl: int,
                         repeats: int) -> dict[str, Measurement]:
    rows = list(range(len(prompt) - num_kl, len(prompt)))
    ref_ms, ref_logits, ref_table = [], None, None
    for _ in range(repeats):  # the runtime's own one-pass prefill
        if ref_table is not None:
            runner.release(ref_table)
        ref_table = BlockTable()
        t0 = time.perf_counter()
        ref_logits = runner.forward([StepInput(ref_table, prompt, logits_rows=rows)])[0]
        ref_ms.append((time.perf_counter() - t0) * 1e3)
    ref_greedy = greedy(runner, ref_table, ref_logits[-1], num_greedy)
    runner.release(ref_table)
    out = {"full_prefill": Measurement(median(ref_ms), 0.0, 1.0, True, 0.0)}
    ref_logp = ref_logits.log_softmax(-1)
    for name, config in configs.items():
        ms, result, table = [], None, None
        for _ in range(repeats):
            if table is not None:
                runner.release(table)
            table = BlockTable()
            t0 = time.perf_counter()
            placed = await lookup_relay(store, model_id, prompt, runner.model.inv_freq, config.min_span_tokens,
                                        device=runner.model.device)
            result = relay_prefill(runner.model, runner.cache, table, prompt, placed, config, logits_rows=rows)
            ms.append((time.perf_counter() - t0) * 1e3)
        tokens = greedy(runner, table, result.logits[-1], num_greedy)
        runner.release(table)
        same = sum(a == b for a, b in zip(tokens, ref_greedy))
        out[name] = Measurement(median(ms), result.reuse_rate, same / num_greedy, same == num_greedy,
                                kl(ref_logp, result))
    return out


def kl(ref_logp: torch.Tensor, result: RelayPrefill) -> float:
    """Mean over rows of KL(full ‖ method) in nats."""
    logp = result.logits.log_softmax(-1)
    return float((ref_logp.exp() * (ref_logp - logp)).sum(-1).mean())


def greedy(runner: ModelRunner, table: BlockTable, logits: torch.Tensor, num_tokens: int) -> list[int]:
    out = [int(logits.argmax())]
    for _ in range(num_tokens - 1):
        out.append(int(runner.forward([StepInput(table, [out[-1]])])[0][-1].argmax()))
    return out


def median(values: list[float]) -> float:
    s = sorted(values)
    return s[len(s) // 2] if len(s) % 2 else (s[len(s) // 2 - 1] + s[len(s) // 2]) / 2
