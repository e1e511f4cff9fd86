"""Shared pieces of the relay tests: a tiny Llama with llama3 RoPE scaling, and an upstream agent that decodes."""

from __future__ import annotations

import torch

from specrelay.services.verifier.relay import SpanKV, capture_span
from specrelay.shared.modeling.kv_cache import BlockTable
from specrelay.shared.modeling.runner import ModelRunner, StepInput

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 64}


def upstream_decode(runner: ModelRunner, prompt: list[int], num_tokens: int, seed: int,
                    max_token: int | None = None) -> tuple[list[int], SpanKV]:
    """Agent A: prefill `prompt`, then sample `num_tokens` one decode step at a time (ids below `max_token`).
    Returns the output and the decode-phase K/V of all of it (each sampled token is fed back once, the last too,
    as a verifier publishing on finish may do with one more step)."""
    gen = torch.Generator().manual_seed(seed)
    table = BlockTable()
    logits = runner.prefill(table, prompt)
    out: list[int] = []
    for _ in range(num_tokens):
        probs = torch.softmax(logits[:max_token] if max_token else logits, -1)
        out.append(int(torch.multinomial(probs, 1, generator=gen)))
        logits = runner.forward([StepInput(table, [out[-1]])])[0][-1]
    span = capture_span(runner.cache, table, len(prompt), len(prompt) + num_tokens, out, runner.model.inv_freq)
    runner.release(table)
    return out, span


def greedy_after(runner: ModelRunner, table: BlockTable, logits: torch.Tensor, num_tokens: int) -> list[int]:
    """Greedy continuation from a prefilled table (decode steps through the runtime)."""
    out = [int(logits.argmax())]
    for _ in range(num_tokens - 1):
        out.append(int(runner.forward([StepInput(table, [out[-1]])])[0][-1].argmax()))
    return out
