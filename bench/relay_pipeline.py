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
from specrelay.services.verifier.relay import RelayConfig, capture_span, relay_prefill
from specrelay.services.verifier.relay_index import lookup_relay, publish_span
from specrelay.shared.modeling.kv_cache import BlockTable
from specrelay.shared.modeling.runner import ModelRunner, StepInput

METHODS = ("full_prefill", "naive_reuse", "epic", "cacheblend", "relaycaching")
# (system, user) of each agent, in the shape of the handoff documents the embedded pair was trained on
# (models/corpus.py); "{}" marks where an earlier agent's output is quoted verbatim.
PLANNER = ("You are the planner agent.", "{lead} asks for a short brief on {topic}. Make a plan.")
WORKER = ("You are the worker agent.", 'The planner wrote:\n"""\n{}\n"""\nCarry out every step.')
REVIEWER = ("You are the reviewer agent.",
            'The planner wrote:\n"""\n{}\n"""\nReview the worker\'s output:\n"""\n{}\n"""')
TASKS = (("Liam", "sourdough bread"), ("Ana", "solar panels"), ("Kofi", "a team offsite"), ("Mei", "code review"))
_QUOTE = "\x1fQUOTE\x1f"


@dataclass
class Measurement:
    """One method on one downstream prompt."""

    ttft_ms: float
    reuse_rate: float
    greedy_agreement: float  # share of the next greedy tokens equal, position by position, to full prefill's
    greedy_exact: bool  # all of them equal
    first_token_match: bool  # the first answer token equal: what the relayed prefill itself decided
    mean_kl: float  # KL(full ‖ method) of the next-token distributions along full prefill's greedy answer
    # where the answers first differ, full prefill's own top-2 probability margin: a margin near 0 means the
    # model itself was torn there (any perturbation flips it), a large one that the reuse changed its mind
    divergence_margin: float | None = None


class Texts:
    """Chat prompts as token ids, with earlier outputs spliced in as ids (never re-tokenized): the model's chat
    template when it has one, else fixed random ids standing in for the text (random dev models)."""

    def __init__(self, model_dir, vocab_size: int, banned: set[int]):
        self.vocab_size, self.banned = vocab_size, banned
        try:
            from specrelay.shared.tokenizer import Tokenizer

            self.tokenizer = Tokenizer(model_dir)
        except Exception:  # a bare weights directory: no tokenizer files
            self.tokenizer = None

    def chat(self, agent: tuple[str, str], quotes: list[list[int]], **fields: str) -> list[int]:
        system, user = agent
        pieces = user.split("{}")
        assert len(pieces) == len(quotes) + 1, f"{len(quotes)} quotes for {user!r}"
        pieces = [p.format(**fields) for p in pieces]
        if self.tokenizer is not None and self.tokenizer.chat_template is not None:
            text = self.tokenizer.render_chat([{"role": "system", "content": system},
                                               {"role": "user", "content": _QUOTE.join(pieces)}])
            parts = text.split(_QUOTE)
        else:
            parts = (system + "\n" + _QUOTE.join(pieces) + "\nassistant:").split(_QUOTE)
        ids = self.encode(parts[0])
        for quote, part in zip(quotes, parts[1:]):
            ids += quote + self.encode(part)
        return ids

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
                       configs: dict[str, RelayConfig], num_greedy: int, repeats: int,
                       banned: list[int]) -> list[dict[str, Measurement]]:
    """Planner writes `span_len` tokens, the worker span_len // 2; returns the measurements of the worker's and
    the reviewer's prefills."""
    gen = torch.Generator().manual_seed(seed)
    inv_freq = runner.model.inv_freq
    lead, topic = TASKS[seed % len(TASKS)]
    planner_prompt = texts.chat(PLANNER, [], lead=lead, topic=topic)
    plan, table = decode_agent(runner, planner_prompt, span_len, gen, banned)
    await publish_span(store, model_id, capture_span(runner.cache, table, len(planner_prompt),
                                                     len(planner_prompt) + len(plan), plan, inv_freq))
    runner.release(table)

    worker_prompt = texts.chat(WORKER, [plan])
    work, table = decode_agent(runner, worker_prompt, span_len // 2, gen, banned)
    await publish_span(store, model_id, capture_span(runner.cache, table, len(worker_prompt),
                                                     len(worker_prompt) + len(work), work, inv_freq))
    runner.release(table)

    reviewer_prompt = texts.chat(REVIEWER, [plan, work])
    results = []
    for prompt in (worker_prompt, reviewer_prompt):
        results.append(await measure_prompt(runner, store, model_id, prompt, configs, num_greedy, repeats))
    return results


async def measure_prompt(runner: ModelRunner, store: KVStore, model_id: str, prompt: list[int],
                         configs: dict[str, RelayConfig], num_greedy: int, repeats: int) -> dict[str, Measurement]:
    """Timed runs interleave the methods (full, naive, ..., full, naive, ...) so that load from other processes
    on the machine falls on all of them alike; the answers are compared after the last run."""
    ms: dict[str, list[float]] = {"full_prefill": [], **{name: [] for name in configs}}
    out: dict[str, Measurement] = {}
    ref_answer: list[int] = []
    ref_dists = torch.empty(0)
    for repeat in range(repeats):
        for name in ms:
            table = BlockTable()
            t0 = time.perf_counter()
            if name == "full_prefill":  # the runtime's own one-pass prefill
                logits, reuse_rate = runner.forward([StepInput(table, prompt)])[0], 0.0
            else:
                config = configs[name]
                placed = await lookup_relay(store, model_id, prompt, runner.model.inv_freq, config.min_span_tokens,
                                            device=runner.model.device)
                result = relay_prefill(runner.model, runner.cache, table, prompt, placed, config)
                logits, reuse_rate = result.logits, result.reuse_rate
            ms[name].append((time.perf_counter() - t0) * 1e3)
            if repeat == repeats - 1:
                if name == "full_prefill":
                    ref_answer, ref_dists = greedy(runner, table, logits[-1], num_greedy)
                    out[name] = Measurement(median(ms[name]), 0.0, 1.0, True, True, 0.0)
                else:
                    out[name] = _compare(runner, table, len(prompt), logits[-1], reuse_rate, ref_answer, ref_dists,
                                         median(ms[name]))
            runner.release(table)
    return out


def _compare(runner: ModelRunner, table: BlockTable, prompt_len: int, logits: torch.Tensor, reuse_rate: float,
             ref_answer: list[int], ref_dists: torch.Tensor, ttft_ms: float) -> Measurement:
    """Distributions along full prefill's answer (teacher-forced), then the method's own greedy answer."""
    num_greedy = len(ref_answer)
    forced = runner.forward([StepInput(table, ref_answer[:-1], logits_rows=list(range(num_greedy - 1)))])[0]
    dists = torch.cat([logits[None], forced]) if num_greedy > 1 else logits[None]
    runner.cache.truncate(table, prompt_len)
    answer, _ = greedy(runner, table, logits, num_greedy)
    same = sum(a == b for a, b in zip(answer, ref_answer))
    first = next((i for i, (a, b) in enumerate(zip(answer, ref_answer)) if a != b), None)
    margin = None
    if first is not None:
        top2 = ref_dists[first].softmax(-1).topk(2).values
        margin = float(top2[0] - top2[1])
    return Measurement(ttft_ms, reuse_rate, same / num_greedy, same == num_greedy, answer[0] == ref_answer[0],
                       kl(ref_dists, dists), margin)


def kl(ref_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean over rows of KL(full ‖ method) in nats. [n, vocab] each."""
    ref_logp, logp = ref_logits.log_softmax(-1), logits.log_softmax(-1)
    return float((ref_logp.exp() * (ref_logp - logp)).sum(-1).mean())


def greedy(runner: ModelRunner, table: BlockTable, logits: torch.Tensor,
           num_tokens: int) -> tuple[list[int], torch.Tensor]:
    """Greedy answer from a prefilled table, and the logits each token was picked from: [num_tokens, vocab]."""
    steps = [logits]
    out = [int(logits.argmax())]
    for _ in range(num_tokens - 1):
        steps.append(runner.forward([StepInput(table, [out[-1]])])[0][-1])
        out.append(int(steps[-1].argmax()))
    return out, torch.stack(steps)


def median(values: list[float]) -> float:
    s = sorted(values)
    return s[len(s) // 2] if len(s) % 2 else (s[len(s) // 2 - 1] + s[len(s) // 2]) / 2
