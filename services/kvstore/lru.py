"""Byte-capacity LRU accounting with pin counts, in plain Python (the local backend's index; the shared-memory and
Redis backends keep the same rules in shared state)."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass
class _Slot:
    nbytes: int
    pins: int = 0


class LruLedger:
    def __init__(self, capacity_bytes: int):
        if capacity_bytes < 1:
            raise ValueError(f"capacity_bytes must be positive, got {capacity_bytes}")
        self.capacity_bytes = capacity_bytes
        self.used_bytes = 0
        self._slots: OrderedDict[bytes, _Slot] = OrderedDict()  # least recently used first

    def __contains__(self, key: bytes) -> bool:
        return key in self._slots

    def __len__(self) -> int:
        return len(self._slots)

    @property
    def num_pinned(self) -> int:
        return sum(1 for s in self._slots.values() if s.pins)

    def touch(self, key: bytes) -> None:
        self._slots.move_to_end(key)

    def victims_for(self, nbytes: int, replacing: bytes | None = None) -> list[bytes] | None:
        """The least recently used unpinned keys whose removal lets `nbytes` fit (`replacing`'s own bytes count as
        free); None if no choice of unpinned keys would."""
        if nbytes > self.capacity_bytes:
            return None
        free = self.capacity_bytes - self.used_bytes
        if replacing is not None and replacing in self._slots:
            free += self._slots[replacing].nbytes
        victims = []
        for key, slot in self._slots.items():
            if free >= nbytes:
                break
            if slot.pins == 0 and key != replacing:
                victims.append(key)
                free += slot.nbytes
        return victims if free >= nbytes else None

    def add(self, key: bytes, nbytes: int) -> None:
        """Insert (or resize) `key` as the most recently used; pins survive a resize."""
        old = self._slots.get(key)
        if old is not None:
            self.used_bytes -= old.nbytes
            old.nbytes = nbytes
            self._slots.move_to_end(key)
        else:
            self._slots[key] = _Slot(nbytes)
        self.used_bytes += nbytes

    def remove(self, key: bytes) -> None:
        self.used_bytes -= self._slots.pop(key).nbytes

    def pins(self, key: bytes) -> int:
        return self._slots[key].pins

    def pin(self, key: bytes) -> bool:
        slot = self._slots.get(key)
        if slot is None:
            return False
        slot.pins += 1
        return True

    def unpin(self, key: bytes) -> bool:
        slot = self._slots.get(key)
        if slot is None or slot.pins == 0:
            return False
        slot.pins -= 1
        return True
