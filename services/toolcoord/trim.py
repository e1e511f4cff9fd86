"""Tool-response trimming: a long tool answer keeps its head and tail, and a marker says how much was cut.

Every token of a tool response is prefilled once and then read by every later decode step (γ·L_seq in PTE), so
an unfiltered 20k-token page costs far more than its prefill. The head usually carries the structure (titles,
the first rows, the start of a traceback) and the tail the conclusion (totals, the final error line), so both are
kept. The marker counts against the limit: a trimmed response is at most `max_tokens` tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from specrelay.shared.errors import ConfigError

MIN_LIMIT_TOKENS = 16  # below this the marker would not fit beside any content


class TokenizerLike(Protocol):
    def encode(self, text: str, *args: Any, **kwargs: Any) -> Any: ...

    def decode(self, ids: list[int], *args: Any, **kwargs: Any) -> str: ...


def encode_ids(tokenizer: TokenizerLike, text: str) -> list[int]:
    """Ids without special tokens, from a transformers tokenizer, a `tokenizers.Tokenizer`, or anything whose
    encode returns a list of ints."""
    try:
        encoded = tokenizer.encode(text, add_special_tokens=False)
    except TypeError:
        encoded = tokenizer.encode(text)
    return list(getattr(encoded, "ids", encoded))


def elision_marker(num_tokens: int) -> str:
    return f"\n[... {num_tokens} tokens elided ...]\n"


@dataclass(frozen=True)
class TrimResult:
    text: str
    original_tokens: int
    kept_tokens: int  # tokens of `text`, marker included
    trimmed_tokens: int  # tokens of the original that were cut (0 when it fitted)


@dataclass(frozen=True)
class TrimConfig:
    """Token limits per tool name; None means no limit."""

    default_max_tokens: int | None = 2048
    per_tool: dict[str, int | None] = field(default_factory=dict)
    head_fraction: float = 0.5  # of the kept tokens, the share taken from the start

    def __post_init__(self) -> None:
        limits = [self.default_max_tokens, *self.per_tool.values()]
        if any(limit is not None and limit < MIN_LIMIT_TOKENS for limit in limits):
            raise ConfigError(f"tool response limits must be at least {MIN_LIMIT_TOKENS} tokens (or unset)")
        if not 0.0 <= self.head_fraction <= 1.0:
            raise ConfigError(f"head_fraction must be within [0, 1], got {self.head_fraction}")

    def limit_for(self, tool_name: str) -> int | None:
        return self.per_tool.get(tool_name, self.default_max_tokens)


def _decode_clean(tokenizer: TokenizerLike, ids: list[int], from_end: bool) -> tuple[str, int]:
    """Decode, giving up to 3 edge tokens so that a cut never leaves half a UTF-8 character (U+FFFD) at the seam.
    Returns the text and how many ids were used."""
    for drop in range(min(4, len(ids) + 1)):
        part = ids[drop:] if from_end else ids[: len(ids) - drop]
        text = tokenizer.decode(part)
        seam = text[:1] if from_end else text[-1:]
        if seam != "\ufffd":
            return text, len(part)
    return tokenizer.decode(ids), len(ids)


def trim_tool_response(text: str, tokenizer: TokenizerLike, max_tokens: int | None,
                       head_fraction: float = 0.5) -> TrimResult:
    ids = encode_ids(tokenizer, text)
    if max_tokens is None or len(ids) <= max_tokens:
        return TrimResult(text=text, original_tokens=len(ids), kept_tokens=len(ids), trimmed_tokens=0)
    if max_tokens < MIN_LIMIT_TOKENS:
        raise ConfigError(f"tool response limit {max_tokens} is below {MIN_LIMIT_TOKENS} tokens")
    budget = max_tokens - len(encode_ids(tokenizer, elision_marker(len(ids))))
    # Re-encoding the joined text can merge or split tokens at the two seams: shrink until it fits.
    for _ in range(8):
        if budget <= 0:
            break
        head_n = int(budget * head_fraction)
        head, head_n = _decode_clean(tokenizer, ids[:head_n], from_end=False)
        tail_ids = ids[len(ids) - (budget - head_n):] if budget > head_n else []
        tail, tail_n = _decode_clean(tokenizer, tail_ids, from_end=True) if tail_ids else ("", 0)
        trimmed = len(ids) - head_n - tail_n
        out = head + elision_marker(trimmed) + tail
        kept = len(encode_ids(tokenizer, out))
        if kept <= max_tokens:
            return TrimResult(text=out, original_tokens=len(ids), kept_tokens=kept, trimmed_tokens=trimmed)
        budget -= kept - max_tokens
    # The marker alone does not fit (a byte-level tokenizer and a tiny limit): keep the head only; usage still
    # reports the cut.
    for keep in range(max_tokens, -1, -1):
        head, head_n = _decode_clean(tokenizer, ids[:keep], from_end=False)
        kept = len(encode_ids(tokenizer, head))
        if kept <= max_tokens:
            return TrimResult(text=head, original_tokens=len(ids), kept_tokens=kept, trimmed_tokens=len(ids) - head_n)
    raise AssertionError("unreachable: the empty head fits any limit")
