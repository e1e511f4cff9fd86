"""The in-process backend: frames in a dict, LRU and pins in an `LruLedger`. The embedded default."""

from __future__ import annotations

from collections.abc import Sequence

from specrelay.services.kvstore.index import leading_present
from specrelay.services.kvstore.lru import LruLedger
from specrelay.services.kvstore.store import KVStore, StoreStats


class LocalStore(KVStore):
    def __init__(self, capacity_bytes: int):
        self.capacity_bytes = capacity_bytes
        self._ledger = LruLedger(capacity_bytes)
        self._frames: dict[bytes, bytes] = {}
        self._hits = self._misses = self._puts = self._rejected = self._evictions = 0

    async def put_frame(self, key: bytes, frame: bytes | memoryview, *, replace: bool = False) -> bool:
        if key in self._ledger and not replace:
            self._ledger.touch(key)
            return True
        victims = self._ledger.victims_for(len(frame), replacing=key)
        if victims is None:
            self._rejected += 1
            return False
        for victim in victims:
            self._ledger.remove(victim)
            del self._frames[victim]
        self._evictions += len(victims)
        self._frames[key] = bytes(frame)  # our own copy: the caller's buffer may be reused
        self._ledger.add(key, len(frame))
        self._puts += 1
        return True

    async def get_frame(self, key: bytes, *, touch: bool = True) -> bytes | None:
        frame = self._frames.get(key)
        if not touch:
            return frame
        if frame is None:
            self._misses += 1
            return None
        self._hits += 1
        self._ledger.touch(key)
        return frame

    async def contains(self, key: bytes) -> bool:
        return key in self._frames

    async def longest_prefix(self, keys: Sequence[bytes]) -> int:
        num_cached = leading_present(key in self._frames for key in keys)
        for key in reversed(keys[:num_cached]):
            self._ledger.touch(key)
        self._hits += num_cached
        self._misses += len(keys) - num_cached
        return num_cached

    async def pin(self, key: bytes) -> bool:
        return self._ledger.pin(key)

    async def unpin(self, key: bytes) -> bool:
        return self._ledger.unpin(key)

    async def delete(self, key: bytes) -> bool:
        if key not in self._ledger or self._ledger.pins(key):
            return False
        self._ledger.remove(key)
        del self._frames[key]
        return True

    async def stats(self) -> StoreStats:
        return StoreStats(
            capacity_bytes=self.capacity_bytes, used_bytes=self._ledger.used_bytes, num_entries=len(self._ledger),
            num_pinned=self._ledger.num_pinned, hits=self._hits, misses=self._misses, puts=self._puts,
            rejected=self._rejected, evictions=self._evictions,
        )

    async def close(self) -> None:
        self._frames.clear()
        self._ledger = LruLedger(self.capacity_bytes)
