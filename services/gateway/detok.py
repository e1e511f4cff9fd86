"""Token ids -> text, incrementally, with stop strings that never leak.

Incremental detokenization: decoding token by token is wrong in two ways — a byte-level BPE token can end in the
middle of a UTF-8 character (decoding it alone gives U+FFFD), and decoders that strip a leading space per call
(SentencePiece) lose spaces between pieces. So each step decodes a short window `ids[prefix:]` and emits only what
it adds over `ids[prefix:read]`; text ending in U+FFFD is held until the next token completes the character.

Stop strings: a stop string may arrive split across tokens, so text that *could* be the start of one is held back
until it either completes (cut there: the stop string and everything after it are never shown) or diverges (then
it is released). The same rule makes streamed and non-streamed text identical.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

_REPLACEMENT = "\ufffd"


class Decoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str: ...


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Decoder, skip_special_tokens: bool = True):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0  # start of the decode window (a few tokens of context for spacing rules)
        self._read = 0  # tokens whose text has been emitted

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip)

    def push(self, token_ids: Sequence[int]) -> str:
        """Text the new tokens add; empty while they end inside a multi-byte character."""
        self.ids.extend(token_ids)
        return self._step(final=False)

    def flush(self) -> str:
        """The text still held at the end of generation (an incomplete character decodes as U+FFFD)."""
        return self._step(final=True)

    def _step(self, final: bool) -> str:
        if self._read == len(self.ids):
            return ""
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        if not final and (len(after) <= len(before) or after.endswith(_REPLACEMENT)):
            return ""
        delta = after[len(before):]
        self._prefix, self._read = self._read, len(self.ids)
        return delta


def _held_suffix_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
    longest = 0
    for stop in stops:
        for n in range(min(len(text), len(stop) - 1), longest, -1):
            if stop.startswith(text[-n:]):
                longest = n
                break
    return longest


@dataclass
class StopResult:
    text: str  # safe to show now
    stopped: bool = False  # a stop string completed: `text` ends just before it; generation must end


class StopMatcher:
    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self._held = ""
        self.stopped = False

    def push(self, text: str) -> StopResult:
        if self.stopped:
            return StopResult("", True)
        combined = self._held + text
        if not self.stops:
            return StopResult(combined)
        hits = [i for i in (combined.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped, self._held = True, ""
            return StopResult(combined[:min(hits)], True)
        keep = _held_suffix_len(combined, self.stops)
        self._held = combined[len(combined) - keep:] if keep else ""
        return StopResult(combined[:len(combined) - keep])

    def flush(self) -> str:
        """Generation ended without the held text becoming a stop string: it is ordinary output."""
        held, self._held = self._held, ""
        return "" if self.stopped else held


class TextStream:
    """Token chunks in, visible text out: detokenization then stop strings. `num_tokens` counts the tokens that
    produced the text, up to the one that completed a stop string (what usage bills)."""

    def __init__(self, tokenizer: Decoder, stops: Sequence[str] = (), skip_special_tokens: bool = True):
        self._detok = IncrementalDetokenizer(tokenizer, skip_special_tokens)
        self._stop = StopMatcher(stops)
        self.num_tokens = 0

    @property
    def stopped(self) -> bool:
        return self._stop.stopped

    def push(self, token_ids: Sequence[int]) -> StopResult:
        if self._stop.stopped:
            return StopResult("", True)
        self.num_tokens += len(token_ids)
        return self._stop.push(self._detok.push(token_ids))

    def finish(self) -> StopResult:
        """At the end of generation: the held tail (which may itself complete a stop string)."""
        if self._stop.stopped:
            return StopResult("", True)
        result = self._stop.push(self._detok.flush())
        if result.stopped:
            return result
        return StopResult(result.text + self._stop.flush())
