"""The logprobs a request asked for: each committed token's log-probability and its top alternatives, read from the
row of the target's logits the token was drawn from — after the prompt for the first token, after its parent's
path for a tree node, after the accepted path for the bonus token — so a token's numbers do not depend on whether
it came through speculation.

The numbers are vLLM's `processed_logprobs` (shared/sampling.py `processed_logprobs`): log-softmax after
logit_bias, the grammar mask and temperature (1 for greedy), before top-k/top-p truncation.
"""

from __future__ import annotations

import torch

from specrelay.shared.messages import TokenLogprob
from specrelay.shared.sampling import SamplingParams, processed_logprobs


def token_logprobs(logits: torch.Tensor, params: SamplingParams, tokens: list[int]) -> list[TokenLogprob]:
    """logits: [len(tokens), vocab], grammar-masked; row j is the distribution tokens[j] was drawn from.
    `top` holds the params.logprobs most likely tokens, most likely first, leaving out tokens of probability 0
    (a grammar's mask can leave fewer than k), so every number is finite for tokens that can occur."""
    logprobs = processed_logprobs(logits, params)  # [len(tokens), vocab]
    chosen = logprobs.gather(-1, torch.tensor(tokens, device=logprobs.device)[:, None])[:, 0].tolist()
    k = min(params.logprobs or 0, logprobs.shape[-1])
    if not k:
        return [TokenLogprob(tok, lp) for tok, lp in zip(tokens, chosen)]
    top = logprobs.topk(k, dim=-1)
    return [TokenLogprob(tok, lp, [(i, v) for i, v in zip(ids, values) if v != float("-inf")])
            for tok, lp, ids, values in zip(tokens, chosen, top.indices.tolist(), top.values.tolist())]
