"""Relayed spans in the kvstore: publish an upstream agent's decode-phase K/V, find it anywhere in a later prompt.

Keys (kvstore/index.py `span_key`, BLAKE2b, model id in every key):
  span entry   span_key("relay-span", model_id, tokens)   -> RelaySpanHeader + K/V bytes [L, 2, n, H_kv, D]
  chunk ref    span_key("relay-chunk", model_id, chunk)   -> RelayChunkRef (which span, at which offset)

A later prompt may quote the span at any offset, so chunk boundaries must not depend on where the text starts.
They are content-defined (as in rsync / LBFS chunking): a boundary falls before token i when a hash of the W tokens
before i is 0 mod `avg_chunk`. Inside a quoted span, at least W tokens past its start, the prompt and the upstream
output therefore cut the same chunks; a hit on one chunk names the span, and the match is then grown token by token
in both directions, which recovers the partial chunks at the span's edges. Lookups skip prompt text already covered
by a found span, so a prompt made mostly of quotes costs a handful of store reads.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec
import numpy as np
import torch

from specrelay.services.kvstore import KVStore, span_key
from specrelay.services.verifier.relay import PlacedSpan, SpanKV
from specrelay.shared.wire import TensorHeader, tensor_from_bytes, tensor_to_bytes

RELAY_KV_LAYOUT = "layer,kv,token,kv_head,head_dim"
WINDOW = 4  # tokens hashed to decide a boundary
AVG_CHUNK = 16  # expected chunk length: one store read per 16 prompt tokens outside found spans
MIN_CHUNK = 4  # shorter chunks are not indexed: too likely to recur by chance

_M = np.uint64(0xFFFFFFFFFFFFFFFF)


class RelaySpanHeader(msgspec.Struct, frozen=True):
    model_id: str
    token_ids: list[int]
    kv: TensorHeader  # [num_layers, 2, n, num_kv_heads, head_dim], keys at relative positions 0 .. n-1


class RelayChunkRef(msgspec.Struct, frozen=True):
    span: bytes  # key of the span entry
    offset: int  # token offset of the chunk within the span


@dataclass(frozen=True)
class SpanMatch:
    """Where a stored span's tokens [span_begin, span_end) sit in the prompt (from `prompt_start`)."""

    span: bytes
    prompt_start: int
    span_begin: int
    span_end: int

    def __len__(self) -> int:
        return self.span_end - self.span_begin


def boundaries(token_ids: list[int] | np.ndarray, avg_chunk: int = AVG_CHUNK) -> list[int]:
    """Content-defined cut points i (a chunk starts at i), from the W tokens before i; excludes 0 and len."""
    t = np.asarray(token_ids, dtype=np.uint64)
    if t.size <= WINDOW:
        return []
    with np.errstate(over="ignore"):
        h = np.zeros(t.size - WINDOW + 1, dtype=np.uint64)
        for j in range(WINDOW):  # a polynomial over the window, then splitmix64's finaliser to spread the bits
            h = h * np.uint64(0x100000001B3) + t[j : t.size - WINDOW + 1 + j] + np.uint64(1)
        h ^= h >> np.uint64(30)
        h = (h * np.uint64(0xBF58476D1CE4E5B9)) & _M
        h ^= h >> np.uint64(27)
        h = (h * np.uint64(0x94D049BB133111EB)) & _M
        h ^= h >> np.uint64(31)
    # h[k] hashes tokens k .. k+W-1, i.e. the window before cut point k + W
    cuts = np.flatnonzero(h % np.uint64(avg_chunk) == 0) + WINDOW
    return [int(c) for c in cuts if c < t.size]


def span_entry_key(model_id: str, token_ids: list[int]) -> bytes:
    return span_key("relay-span", model_id, np.asarray(token_ids, dtype="<u4").tobytes())


def chunk_key(model_id: str, token_ids: list[int]) -> bytes:
    return span_key("relay-chunk", model_id, np.asarray(token_ids, dtype="<u4").tobytes())


async def publish_span(store: KVStore, model_id: str, span: SpanKV) -> int:
    """Store the span's K/V and index its chunks. Returns the number of chunks indexed (0: too short to find,
    or refused for room)."""
    tokens = list(span.token_ids)
    key = span_entry_key(model_id, tokens)
    kv = torch.stack((span.k, span.v), dim=1)  # [num_layers, 2, n, H_kv, D]
    header, data = tensor_to_bytes(kv, RELAY_KV_LAYOUT)
    if not await store.put_span(key, RelaySpanHeader(model_id, tokens, header), data):
        return 0
    cuts = boundaries(tokens)
    num_indexed = 0
    for begin, end in zip(cuts, cuts[1:]):  # interior chunks: both ends are content-defined
        if end - begin >= MIN_CHUNK:
            await store.put_span(chunk_key(model_id, tokens[begin:end]), RelayChunkRef(key, begin), b"")
            num_indexed += 1
    return num_indexed


Entries = dict[bytes, tuple[RelaySpanHeader, bytes] | None]  # span entries read so far, by key


async def find_spans(store: KVStore, model_id: str, prompt: list[int], min_tokens: int = 16,
                     entries: Entries | None = None) -> list[SpanMatch]:
    """Every stored span quoted in `prompt` (longest extension of each chunk hit), in prompt order. The span
    entries read on the way are left in `entries`, so that `load_spans` does not read them again."""
    cuts = [0, *boundaries(prompt), len(prompt)]
    entries = {} if entries is None else entries
    matches: list[SpanMatch] = []
    covered = 0
    for begin, end in zip(cuts, cuts[1:]):
        if begin < covered or end - begin < MIN_CHUNK:
            continue
        found = await store.get_span(chunk_key(model_id, prompt[begin:end]), RelayChunkRef)
        if found is None:
            continue
        ref = found[0]
        if ref.span not in entries:
            entries[ref.span] = await store.get_span(ref.span, RelaySpanHeader)
        if entries[ref.span] is None:
            continue
        tokens = entries[ref.span][0].token_ids
        if tokens[ref.offset : ref.offset + end - begin] != prompt[begin:end]:
            continue
        s_begin, p_begin = ref.offset, begin
        while s_begin > 0 and p_begin > covered and tokens[s_begin - 1] == prompt[p_begin - 1]:
            s_begin, p_begin = s_begin - 1, p_begin - 1
        s_end, p_end = ref.offset + end - begin, end
        while s_end < len(tokens) and p_end < len(prompt) and tokens[s_end] == prompt[p_end]:
            s_end, p_end = s_end + 1, p_end + 1
        if p_end - p_begin >= min_tokens:
            matches.append(SpanMatch(ref.span, p_begin, s_begin, s_end))
            covered = p_end
    return matches


async def load_spans(store: KVStore, matches: list[SpanMatch], inv_freq: torch.Tensor,
                     device: torch.device | str | None = None, entries: Entries | None = None) -> list[PlacedSpan]:
    """The K/V of each match, re-based to relative positions; matches whose entry was evicted meanwhile are
    dropped (their tokens are then prefilled as usual)."""
    placed = []
    entries = {} if entries is None else entries
    spans: dict[bytes, SpanKV | None] = {}
    for m in matches:
        if m.span not in spans:
            if m.span not in entries:
                entries[m.span] = await store.get_span(m.span, RelaySpanHeader)
            entry = entries[m.span]
            if entry is None:
                spans[m.span] = None
            else:
                header, data = entry
                kv = tensor_from_bytes(header.kv, data, expect_layout=RELAY_KV_LAYOUT, device=device)
                spans[m.span] = SpanKV(tuple(header.token_ids), kv[:, 0], kv[:, 1])
        span = spans[m.span]
        if span is not None:
            placed.append(PlacedSpan(m.prompt_start, span.slice(m.span_begin, m.span_end, inv_freq)))
    return placed


async def lookup_relay(store: KVStore, model_id: str, prompt: list[int], inv_freq: torch.Tensor,
                       min_tokens: int = 16, device: torch.device | str | None = None) -> list[PlacedSpan]:
    """find_spans + load_spans: what a verifier calls before `relay_prefill`."""
    entries: Entries = {}
    matches = await find_spans(store, model_id, prompt, min_tokens, entries)
    return await load_spans(store, matches, inv_freq, device, entries)
