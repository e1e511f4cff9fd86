"""ModelRunner: owns a model and its paged KV cache and runs forwards for sequences described by block tables.

The decoding primitives live here: chunked prefill, a batched decode step, and `generate` (plain autoregressive
decoding, the baseline every speculative path must match token for token under greedy).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specrelay.shared.modeling.batch import ForwardBatch
from specrelay.shared.modeling.kv_cache import BlockTable
from specrelay.shared.modeling.llama import LlamaForCausalLM
from specrelay.shared.sampling import SamplingParams, make_generator, processed_probs, sample


@dataclass
class StepInput:
    """One sequence's share of a forward."""

    table: BlockTable  # advanced by len(token_ids) once the forward has written their K/V
    token_ids: list[int]
    positions: list[int] | None = None  # default: table.num_tokens + arange (a tree passes context_len + depth)
    tree_mask: torch.Tensor | None = None  # [n, n] bool, or [n, num_tokens - mask_start + n]; None = causal
    mask_start: int | None = None  # cached tokens from here on are masked too (default: none are)
    logits_rows: list[int] | None = None  # which of token_ids want logits; default: the last one


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, num_blocks: int = 512, block_size: int = 16,
                 prefill_chunk: int = 512):
        self.model = model
        self.cache = model.make_cache(num_blocks, block_size)
        self.prefill_chunk = prefill_chunk

    @property
    def max_model_len(self) -> int:
        return self.model.config.max_model_len

    def forward(self, steps: list[StepInput]) -> list[torch.Tensor]:
        """Runs the new tokens of every step in one forward; returns per step float32 logits [num_rows, vocab]."""
        return self.forward_hidden(steps)[0]

    def forward_hidden(self, steps: list[StepInput]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """As `forward`, plus per step the last layer's normed hidden states of the same rows [num_rows, hidden]."""
        slots = [self.cache.reserve(s.table, len(s.token_ids)) for s in steps]
        batch = ForwardBatch.build(
            token_ids=[s.token_ids for s in steps],
            context_lens=[s.table.num_tokens for s in steps],
            slots=slots,
            block_tables=[s.table.blocks for s in steps],
            positions=None if all(s.positions is None for s in steps) else [
                s.positions if s.positions is not None else
                list(range(s.table.num_tokens, s.table.num_tokens + len(s.token_ids))) for s in steps],
            tree_masks=[s.tree_mask for s in steps],
            mask_starts=[s.mask_start for s in steps],
            logits_rows=[s.logits_rows if s.logits_rows is not None else [len(s.token_ids) - 1] for s in steps],
            window=self.model.config.sliding_window or 0,
            device=self.model.device,
        )
        logits, hidden = self.model.forward_hidden(batch, self.cache)
        for s in steps:
            s.table.num_tokens += len(s.token_ids)
        sizes = [len(s.logits_rows) if s.logits_rows is not None else 1 for s in steps]
        return list(logits.split(sizes)), list(hidden.split(sizes))

    def prefill(self, table: BlockTable, token_ids: list[int]) -> torch.Tensor:
        """Chunked prefill of one sequence; returns the logits [vocab] after its last token."""
        logits = None
        for start in range(0, len(token_ids), self.prefill_chunk):
            chunk = token_ids[start : start + self.prefill_chunk]
            logits = self.forward([StepInput(table, chunk)])[0]
        return logits[-1]

    def release(self, table: BlockTable) -> None:
        self.cache.release(table)

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
        """Plain decoding for a batch of prompts: one prefill each, then one batched decode step per token."""
        if params.max_tokens == 0:
            return [[] for _ in prompts]
        tables = [BlockTable() for _ in prompts]
        generator = make_generator(params, self.model.device)
        outputs: list[list[int]] = [[] for _ in prompts]
        last = torch.stack([self.prefill(t, p) for t, p in zip(tables, prompts)])
        live = list(range(len(prompts)))
        try:
            while live:
                next_ids = self._pick(last, params, generator)
                still = []
                for i, token in zip(live, next_ids):
                    outputs[i].append(token)
                    done = token in params.stop_token_ids or len(outputs[i]) >= params.max_tokens
                    if done or tables[i].num_tokens + 1 >= self.max_model_len:
                        self.cache.release(tables[i])
                    else:
                        still.append(i)
                live = still
                if live:
                    last = torch.cat(self.forward([StepInput(tables[i], [outputs[i][-1]]) for i in live]))
        finally:
            for t in tables:
                self.cache.release(t)
        return outputs

    @staticmethod
    def _pick(logits: torch.Tensor, params: SamplingParams, generator) -> list[int]:
        if params.greedy:
            return logits.argmax(-1).tolist()
        return sample(processed_probs(logits, params), generator).tolist()
