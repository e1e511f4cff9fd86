"""Token logprobs in OpenAI's two shapes, from the verifier's `TokenLogprob`s (shared/messages.py).

The numbers are the target's processed distribution at each committed token (vLLM's `processed_logprobs`:
log-softmax after logit_bias, the grammar mask and temperature, 1 for greedy, before top-k/top-p), the same whether
or not the token came through speculation. A token is shown as the tokenizer decodes it alone (special tokens
included: the end-of-turn token that ended a reply is billed, so it is listed); `bytes` are that text's UTF-8
bytes, so a token that ends inside a multi-byte character reads as U+FFFD there, as in vLLM.

  chat         choices[i].logprobs = {"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}],
               "refusal": null}; top_logprobs: the `top_logprobs` most likely tokens, most likely first
  completions  choices[i].logprobs = {tokens, token_logprobs, top_logprobs: [{token: logprob}], text_offset}; each
               dict holds the `logprobs` most likely tokens and the chosen one (up to k + 1 entries, as vLLM and
               OpenAI's legacy API); text_offset: where each token's text starts in the choice's text
"""

from __future__ import annotations

from typing import Any

from specrelay.services.gateway.detok import Decoder
from specrelay.shared.messages import TokenLogprob


class LogprobsView:
    """Renders one request's logprobs (`k`: alternatives per token) for its choices, chunk by chunk."""

    def __init__(self, tokenizer: Decoder, k: int):
        self.tokenizer, self.k = tokenizer, k
        self._text_offsets: dict[int, int] = {}  # choice index -> characters of token text rendered so far
        self._pieces: dict[int, str] = {}

    def token(self, token_id: int) -> str:
        if (piece := self._pieces.get(token_id)) is None:
            piece = self._pieces[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return piece

    def _entry(self, token_id: int, logprob: float) -> dict[str, Any]:
        text = self.token(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8", "surrogatepass"))}

    def chat(self, entries: list[TokenLogprob]) -> dict[str, Any]:
        return {"content": [{**self._entry(e.token_id, e.logprob),
                             "top_logprobs": [self._entry(t, lp) for t, lp in e.top[:self.k]]} for e in entries],
                "refusal": None}

    def completion(self, entries: list[TokenLogprob], index: int = 0) -> dict[str, Any]:
        tokens = [self.token(e.token_id) for e in entries]
        offsets, at = [], self._text_offsets.get(index, 0)
        for text in tokens:
            offsets.append(at)
            at += len(text)
        self._text_offsets[index] = at
        tops = []
        for e, text in zip(entries, tokens):
            top = {self.token(t): lp for t, lp in e.top[:self.k]}
            top.setdefault(text, e.logprob)
            tops.append(top)
        return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries], "top_logprobs": tops,
                "text_offset": offsets}
