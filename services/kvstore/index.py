"""Content keys of the kvstore: the prefix hash chain of KV blocks, and span keys for relayed KV.

Block hash chain (the scheme of vLLM's automatic prefix caching, in our own encoding):
    root      = H_model(model_id)
    hash_i    = H_block(hash_{i-1} ‖ token_ids of block i as little-endian uint32)     hash_{-1} = root
so a block's hash names its whole prefix: equal hashes mean equal model and equal tokens from position 0, which is
what makes its KV reusable. Only full blocks are hashed; the KV of a partial block changes as tokens are appended.
H is BLAKE2b-256 with a different personalisation per key kind, so a block key, a span key and a model root can never
collide with each other (never Python's `hash`, which is salted per process).

Because every block's key depends on all earlier blocks, a prefix lookup stops at the first missing block: block i
without block i-1 cannot be used (its KV attends to the missing tokens). The store therefore evicts a chain from its
tail (see store.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from hashlib import blake2b

import numpy as np

KEY_BYTES = 32


def model_root(model_id: str) -> bytes:
    return blake2b(model_id.encode(), digest_size=KEY_BYTES, person=b"specrelay-model").digest()


def block_hashes(model_id: str, token_ids: Sequence[int] | np.ndarray, block_size: int,
                 parent: bytes | None = None) -> list[bytes]:
    """The hash of every full block of `token_ids`; `parent` continues a chain (the hash of the block before
    token_ids[0]), else the chain starts at the model's root. `model_id` must name everything else that changes
    the KV of the same tokens (weights, KV dtype, RoPE scaling), e.g. "qwen2.5-7b@<revision>:bf16"."""
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    tokens = np.asarray(token_ids, dtype=np.int64)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2**32):
        raise ValueError("token ids must fit in uint32")
    encoded = tokens.astype("<u4")
    prev = parent if parent is not None else model_root(model_id)
    hashes = []
    for start in range(0, len(encoded) - block_size + 1, block_size):
        h = blake2b(prev, digest_size=KEY_BYTES, person=b"specrelay-block")
        h.update(encoded[start:start + block_size].tobytes())
        prev = h.digest()
        hashes.append(prev)
    return hashes


def span_key(*parts: str | bytes | int) -> bytes:
    """A key in the span space from any parts (e.g. model id, producing request, token range). Parts are
    length-prefixed so ("ab", "c") and ("a", "bc") differ."""
    h = blake2b(digest_size=KEY_BYTES, person=b"specrelay-span")
    for part in parts:
        raw = part if isinstance(part, bytes) else str(part).encode()
        h.update(len(raw).to_bytes(8, "little"))
        h.update(raw)
    return h.digest()


def leading_present(present: Iterable[bool]) -> int:
    """How many blocks from the start are all present: the usable cached prefix."""
    n = 0
    for p in present:
        if not p:
            break
        n += 1
    return n
