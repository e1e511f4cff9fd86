"""Chunked prefill beside decode steps (SARATHI: Agrawal et al., "SARATHI: Efficient LLM Inference by Piggybacking
Decodes with Chunked Prefills", 2023; the stall-free batching of Sarathi-Serve, OSDI 2024).

Unchunked, a request's whole prompt is prefilled in the step that admits it, and every running stream waits for
it: a 2,000-token prompt stalls them all for as long as its prefill takes. Chunked, a step prefills at most
`budget` prompt tokens (of one or several waiting prompts, in admission order, in one forward) after its decode
step, so a running stream's gap between tokens is at most one decode plus one chunk, whatever arrives. A prompt's
KV blocks are all reserved when it starts (the scheduler counted them then); its first token is drawn after its
last chunk, from the same logits an unchunked prefill gives — causal attention over the cached chunks computes the
same function — so the output does not change.

Ours runs the chunk as a forward of its own after the decode forward; SARATHI fuses the decode tokens into the
chunk's forward so both share one pass over the weights (left for later: the decode path verifies draft trees).
"""

from __future__ import annotations

from typing import Any

import torch

from specrelay.shared.modeling.runner import ModelRunner, StepInput


class ChunkedPrefill:
    def __init__(self, runner: ModelRunner, budget: int):
        if budget < 1:
            raise ValueError(f"chunked prefill: the token budget must be >= 1, got {budget}")
        self.runner, self.budget = runner, budget
        self.queue: list[Any] = []  # the engine's Requests whose prompts are being prefilled, in admission order

    def start(self, req: Any) -> None:
        """Queue a request whose table holds a prefix of its prompt (or nothing); its blocks are reserved now."""
        if req.table.num_tokens >= len(req.prompt):
            raise ValueError("the last prompt token must be computed for its logits")
        self.runner.cache.reserve(req.table, len(req.prompt) - req.table.num_tokens)
        self.queue.append(req)

    def step(self) -> list[tuple[Any, torch.Tensor]]:
        """Prefill up to `budget` prompt tokens; returns (request, logits [vocab] after its last prompt token) for
        each request whose prompt is now complete, which leaves the queue."""
        left, steps, reqs = self.budget, [], []
        for r in self.queue:
            if left <= 0:
                break
            n = min(left, len(r.prompt) - r.table.num_tokens)
            steps.append(StepInput(r.table, r.prompt[r.table.num_tokens : r.table.num_tokens + n]))
            reqs.append(r)
            left -= n
        if not steps:
            return []
        logits = self.runner.forward(steps)
        done = [(r, lg[-1]) for r, lg in zip(reqs, logits) if r.table.num_tokens == len(r.prompt)]
        self.queue = [r for r in self.queue if r.table.num_tokens < len(r.prompt)]
        return done

    def remove_all(self) -> list[Any]:
        queue, self.queue = self.queue, []
        return queue

    def remove(self, req: Any) -> bool:
        """Take a request out of the queue (cancelled, or its prefill failed); the caller frees its KV."""
        if req in self.queue:
            self.queue.remove(req)
            return True
        return False
