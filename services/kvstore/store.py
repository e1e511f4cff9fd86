"""The KV block store interface, shared by the local, shared-memory and Redis backends.

One key space of 32-byte content keys (index.py): KV blocks under their hash-chain key, relayed spans under
`span_key(...)`. A value is a wire frame (`u32 len | msgpack header | raw bytes`): for a block the header is a
`TensorHeader` of the `[num_layers, 2, block_size, num_kv_heads, head_dim]` tensor, for a span any msgspec Struct.

Capacity is in bytes (frame sizes). When a put does not fit, the least recently used *unpinned* entries are evicted;
if even evicting every unpinned entry would not make room, the put is refused (returns False) and nothing is
evicted. Pins are counts: an entry is evictable only when every pin has been released.

Chains are evicted from the tail: `put_blocks` writes a chain last block first and `longest_prefix` refreshes a
found prefix last block first, so the first block is always the most recently used. Under pressure the store then
drops the blocks that are useless without their predecessors before the predecessors (vLLM frees a finished
sequence's blocks in reverse order for the same reason).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TypeVar

import msgspec
import torch

from specrelay.services.kvstore.index import KEY_BYTES
from specrelay.shared.wire import (
    KV_BLOCK_LAYOUT,
    TensorHeader,
    decode_frame,
    encode_frame,
    tensor_from_bytes,
    tensor_to_bytes,
)

H = TypeVar("H", bound=msgspec.Struct)

_encoder = msgspec.msgpack.Encoder()
_tensor_header = msgspec.msgpack.Decoder(TensorHeader)


class StoreStats(msgspec.Struct, frozen=True):
    capacity_bytes: int
    used_bytes: int
    num_entries: int
    num_pinned: int  # entries with at least one pin
    hits: int  # blocks or spans found by get / longest_prefix
    misses: int  # looked up and not usable (absent, or after the first gap of a chain)
    puts: int  # entries written
    rejected: int  # puts refused: larger than the capacity, or no room without evicting pinned entries
    evictions: int


class KVStore(ABC):
    """Async so that the Redis backend fits the same loop; the in-process backends never suspend."""

    capacity_bytes: int

    # -- what a backend provides: opaque frames under 32-byte keys -------------------------------------------------

    @abstractmethod
    async def put_frame(self, key: bytes, frame: bytes | memoryview, *, replace: bool = False) -> bool:
        """Store `frame` under `key` as the most recently used entry. An existing key is only refreshed unless
        `replace` (content keys never change value; span keys may). False if refused for lack of room."""

    @abstractmethod
    async def get_frame(self, key: bytes, *, touch: bool = True) -> bytes | memoryview | None:
        """The frame, made most recent and counted as a hit or a miss; with `touch=False` neither (a read that
        `longest_prefix` has already counted and ordered)."""

    @abstractmethod
    async def contains(self, key: bytes) -> bool:
        """Presence only: no hit or miss counted, no LRU refresh."""

    @abstractmethod
    async def longest_prefix(self, keys: Sequence[bytes]) -> int:
        """How many of `keys`, from the first, are all present; refreshes those, last first."""

    @abstractmethod
    async def pin(self, key: bytes) -> bool:
        """One more pin on `key` (never evicted while pinned); False if absent."""

    @abstractmethod
    async def unpin(self, key: bytes) -> bool:
        """Release one pin; False if `key` is absent or was not pinned."""

    @abstractmethod
    async def delete(self, key: bytes) -> bool:
        """Remove an unpinned entry; False if absent or pinned."""

    @abstractmethod
    async def stats(self) -> StoreStats: ...

    @abstractmethod
    async def close(self) -> None: ...

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # -- KV blocks -------------------------------------------------------------------------------------------------

    async def put_block(self, block_hash: bytes, kv: torch.Tensor) -> bool:
        """kv: [num_layers, 2, block_size, num_kv_heads, head_dim], any dtype, any device (copied to the store)."""
        _check_key(block_hash)
        if kv.dim() != 5 or kv.shape[1] != 2:
            raise ValueError(f"a KV block is [num_layers, 2, block_size, num_kv_heads, head_dim], got {list(kv.shape)}")
        header, data = tensor_to_bytes(kv, KV_BLOCK_LAYOUT)
        return await self.put_frame(block_hash, encode_frame(_encoder.encode(header), data))

    async def put_blocks(self, block_hashes: Sequence[bytes], kvs: Sequence[torch.Tensor]) -> None:
        """Store a chain. The blocks are written last first, so when not all fit it is the head that stays (the
        head's puts evict the tail's), and the head ends up the most recently used."""
        if len(block_hashes) != len(kvs):
            raise ValueError(f"{len(block_hashes)} hashes for {len(kvs)} blocks")
        for block_hash, kv in zip(reversed(block_hashes), reversed(kvs)):
            await self.put_block(block_hash, kv)

    async def get_block(self, block_hash: bytes, *, device: torch.device | str | None = None,
                        touch: bool = True) -> torch.Tensor | None:
        frame = await self.get_frame(block_hash, touch=touch)
        if frame is None:
            return None
        header_bytes, data = decode_frame(frame)
        # copy=True: the frame may live in memory that another process can reuse once we return.
        return tensor_from_bytes(_tensor_header.decode(header_bytes), data, expect_layout=KV_BLOCK_LAYOUT,
                                 device=device, copy=device is None)

    async def get_prefix(self, block_hashes: Sequence[bytes], *,
                         device: torch.device | str | None = None) -> list[torch.Tensor]:
        """The KV of the longest cached prefix of a chain (possibly shorter than `longest_prefix` said, if another
        process evicted a block in between: the list stops at the first block that is gone)."""
        num_cached = await self.longest_prefix(block_hashes)
        blocks = []
        for block_hash in block_hashes[:num_cached]:
            kv = await self.get_block(block_hash, device=device, touch=False)  # keep the tail-first LRU order
            if kv is None:
                break
            blocks.append(kv)
        return blocks

    # -- relayed spans: any header Struct + raw bytes --------------------------------------------------------------

    async def put_span(self, key: bytes, header: msgspec.Struct, data: bytes | memoryview) -> bool:
        _check_key(key)
        return await self.put_frame(key, encode_frame(_encoder.encode(header), data), replace=True)

    async def get_span(self, key: bytes, header_type: type[H]) -> tuple[H, bytes] | None:
        frame = await self.get_frame(key)
        if frame is None:
            return None
        header_bytes, data = decode_frame(frame)
        return msgspec.msgpack.decode(header_bytes, type=header_type), bytes(data)


def _check_key(key: bytes) -> None:
    if not isinstance(key, bytes) or len(key) != KEY_BYTES:
        raise ValueError(f"store keys are {KEY_BYTES}-byte digests from index.py, got {key!r:.40}")
