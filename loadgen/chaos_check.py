"""What a chaos run compares against: the target model's own greedy output for each prompt, decoded by plain
autoregressive decoding in this process (no bus, no drafter, no Redis), and how a streamed answer differs from it.

Greedy speculative decoding is lossless, so whatever a fault does, a request that completes must stream exactly
the reference text; a chunk the stream repeats (a Generate admitted twice, a step replayed after a restart) shows
up as text the alignment below has already consumed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


class Encoder(Protocol):
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]: ...


@dataclass(frozen=True)
class Reference:
    prompt_ids: list[int]
    max_tokens: int
    token_ids: list[int]  # the target's greedy continuation, its stop token included (the gateway counts it)
    text: str  # as the gateway streams it: special tokens skipped


@dataclass
class Comparison:
    equal: bool  # the whole streamed text is the reference text
    duplicated_chunks: int
    duplicated_tokens: int  # tokens of the text that was streamed twice
    diverged_at: int | None  # the reference character where the stream went its own way (None: it never did)


def compare(chunks: list[str], reference: str, tokenizer: Encoder) -> Comparison:
    """Aligns the streamed chunks with the reference, in order. A chunk that continues the reference advances; a
    chunk whose head repeats text already streamed (its tail, if any, continuing the reference) is a duplicate;
    anything else is a divergence, after which nothing more is aligned."""
    pos, dup_chunks, dup_tokens, diverged = 0, 0, 0, None
    for chunk in chunks:
        if reference.startswith(chunk, pos):
            pos += len(chunk)
            continue
        repeat = _repeated_head(chunk, reference, pos)
        if repeat:
            dup_chunks += 1
            dup_tokens += max(1, len(tokenizer.encode(chunk[:repeat])))
            pos += len(chunk) - repeat
            continue
        diverged = pos
        break
    text = "".join(chunks)
    return Comparison(text == reference, dup_chunks, dup_tokens, diverged)


def _repeated_head(chunk: str, reference: str, pos: int) -> int:
    """The longest head of `chunk` that is a repeat of text streamed before `pos` while the rest of the chunk
    continues the reference from `pos` (0: none)."""
    for n in range(len(chunk), 0, -1):
        head, tail = chunk[:n], chunk[n:]
        if head in reference[:pos] and reference.startswith(tail, pos):
            return n
    return 0


def greedy_references(model_dir: str | Path, prompts: list[tuple[list[int], int]], stop_token_ids: list[int],
                      decode) -> list[Reference]:
    """The target's greedy output for each (prompt ids, max_tokens), by plain decoding (ModelRunner.generate, the
    baseline every speculative path must match token for token)."""
    import torch

    from specrelay.shared.modeling.loader import load_model
    from specrelay.shared.modeling.runner import ModelRunner
    from specrelay.shared.sampling import SamplingParams

    torch.set_num_threads(1)  # a tiny model on a small shared CPU: one thread is several times faster than two
    runner = ModelRunner(load_model(model_dir))
    references = []
    with torch.inference_mode():
        for prompt_ids, max_tokens in prompts:  # one at a time: a request decoded alone, as a batch of one
            params = SamplingParams(temperature=0.0, max_tokens=max_tokens, stop_token_ids=tuple(stop_token_ids))
            [ids] = runner.generate([prompt_ids], params)
            references.append(Reference(prompt_ids, max_tokens, ids, decode(ids)))
    return references
