"""The shared-memory backend: every entry in its own `multiprocessing.shared_memory` segment, and the index in one
more small segment that every process on the machine maps. Linux (/dev/shm).

Why the index lives in shared memory, not in Redis: the point of this backend is that processes on one machine
(verifier, drafter, kvstore) exchange KV without a socket; an index behind a socket would put a round trip back on
every lookup. The index is a fixed-size open-addressing hash table (linear probing, tombstones, rebuilt in place
when tombstones pile up), guarded by `flock` on the index segment (a threading lock covers threads of one process):

  segment "<name>.idx":  header (13 × u64: magic, slots, max entries, capacity, used, clock, entries, tombstones,
                         hits, misses, puts, rejected, evictions) | slots × SLOT_DTYPE (state, pins, nbytes,
                         last_use, 32-byte key)
  segment "<name>.<hex key>":  the entry's frame

LRU uses a logical clock in the header; eviction picks the unpinned slots with the smallest `last_use` (a vectorised
scan, no list to keep in order across processes). Ownership: the process that creates the store owns every segment
and unlinks all of them on `close()`; attached processes only unmap. Segment lifetime therefore belongs to the
index, not to the process that happened to create it, so every segment is taken away from Python's resource
tracker (which would otherwise unlink a segment when its creating process exits, behind the index's back). A store
left by a crashed owner is removed with `ShmStore.destroy(name)`.

Reads map the entry read-only with mmap under the lock and return that mapping: once mapped, the bytes stay valid
even if another process evicts (unlinks) the entry, so a read is zero-copy and never sees a torn value.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import re
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from multiprocessing import resource_tracker, shared_memory

import numpy as np

from specrelay.services.kvstore.index import KEY_BYTES
from specrelay.services.kvstore.store import KVStore, StoreStats
from specrelay.shared.errors import ConfigError, SpecrelayError

SHM_DIR = "/dev/shm"
_MAGIC = 0x314D_4853_564B_5253  # "SRKVSHM1"
(_MAGIC_I, _SLOTS, _MAX_ENTRIES, _CAPACITY, _USED, _CLOCK, _ENTRIES, _TOMBS,
 _HITS, _MISSES, _PUTS, _REJECTED, _EVICTIONS) = range(13)
_HEAD_BYTES = 128
SLOT_DTYPE = np.dtype([("state", "u1"), ("pad", "u1", (3,)), ("pins", "<u4"), ("nbytes", "<u8"),
                       ("last_use", "<u8"), ("key", "u1", (KEY_BYTES,))])
_EMPTY, _LIVE, _TOMBSTONE = 0, 1, 2
_NAME = re.compile(r"[A-Za-z0-9_-]{1,100}")


class StoreClosed(SpecrelayError):
    """The shared-memory store was closed by its owner."""


class ShmStore(KVStore):
    def __init__(self, name: str, capacity_bytes: int | None = None, *, max_entries: int = 32_768,
                 create: bool = True):
        if not _NAME.fullmatch(name):
            raise ConfigError(f"shm store name {name!r}: use 1-100 letters, digits, '-' or '_'")
        if not os.path.isdir(SHM_DIR):
            raise ConfigError(f"the shared-memory store needs {SHM_DIR} (Linux)")
        self.name = name
        self.owner = create
        self._thread_lock = threading.Lock()
        index_name = f"{name}.idx"
        if create:
            if capacity_bytes is None or capacity_bytes < 1 or max_entries < 1:
                raise ValueError("a new shm store needs a positive capacity_bytes and max_entries")
            num_slots = max_entries * 4 // 3 + 1  # load factor <= 3/4 keeps probe sequences short
            try:
                self._index = _open_segment(index_name, create=True, size=_HEAD_BYTES + num_slots * SLOT_DTYPE.itemsize)
            except FileExistsError:
                raise ConfigError(f"shm store {name!r} already exists: attach with create=False, or remove what a "
                                  f"crashed owner left with ShmStore.destroy({name!r})") from None
        else:
            try:
                self._index = _open_segment(index_name, create=False)
            except FileNotFoundError:
                raise ConfigError(f"no shm store named {name!r} on this machine") from None
        self._lock_fd = os.open(os.path.join(SHM_DIR, index_name), os.O_RDWR)
        self._head = np.ndarray((13,), "<u8", buffer=self._index.buf)
        if create:
            self._head[:] = 0
            self._head[[_SLOTS, _MAX_ENTRIES, _CAPACITY]] = (num_slots, max_entries, capacity_bytes)
        elif self._head[_MAGIC_I] != _MAGIC:
            self._release()
            raise ConfigError(f"shm store {name!r} is not initialised or has been closed")
        num_slots = int(self._head[_SLOTS])
        slots = np.ndarray((num_slots,), SLOT_DTYPE, buffer=self._index.buf, offset=_HEAD_BYTES)
        self._state, self._pins, self._nbytes = slots["state"], slots["pins"], slots["nbytes"]
        self._last_use, self._keys = slots["last_use"], slots["key"]
        self._slots = slots
        if create:
            slots[:] = np.zeros((), SLOT_DTYPE)
            self._head[_MAGIC_I] = _MAGIC  # last: an attacher sees a fully initialised table or none
        self.capacity_bytes = int(self._head[_CAPACITY])
        self._max_entries = int(self._head[_MAX_ENTRIES])

    @classmethod
    def attach(cls, name: str) -> ShmStore:
        return cls(name, create=False)

    @staticmethod
    def destroy(name: str) -> int:
        """Unlink every segment of store `name` (e.g. after its owner crashed); returns how many were removed."""
        removed = 0
        for entry in os.listdir(SHM_DIR):
            if entry.startswith(f"{name}.") and (entry == f"{name}.idx" or len(entry) == len(name) + 1 + 2 * KEY_BYTES):
                os.unlink(os.path.join(SHM_DIR, entry))
                removed += 1
        return removed

    # -- locking and the hash table --------------------------------------------------------------------------------

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with self._thread_lock:
            if self._head is None:
                raise StoreClosed(f"shm store {self.name!r} is closed")
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            try:
                if self._head[_MAGIC_I] != _MAGIC:
                    raise StoreClosed(f"shm store {self.name!r} was closed by its owner")
                yield
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _find(self, key: bytes) -> tuple[int, int]:
        """(slot holding key or -1, first slot a new key may take or -1)."""
        num_slots = len(self._state)
        i = int.from_bytes(key[:8], "little") % num_slots
        insert = -1
        for _ in range(num_slots):
            state = self._state[i]
            if state == _EMPTY:
                return -1, insert if insert >= 0 else i
            if state == _TOMBSTONE:
                if insert < 0:
                    insert = i
            elif self._keys[i].tobytes() == key:
                return i, insert
            i = (i + 1) % num_slots
        return -1, insert

    def _touch(self, slot: int) -> None:
        self._head[_CLOCK] += 1
        self._last_use[slot] = self._head[_CLOCK]

    def _segment(self, slot: int) -> str:
        return f"{self.name}.{self._keys[slot].tobytes().hex()}"

    def _remove(self, slot: int) -> None:
        _unlink(self._segment(slot))
        self._state[slot] = _TOMBSTONE
        self._pins[slot] = 0
        self._head[_USED] -= self._nbytes[slot]
        self._head[_ENTRIES] -= 1
        self._head[_TOMBS] += 1

    def _victims(self, nbytes: int, replacing: int) -> list[int] | None:
        """Least recently used unpinned slots to free so that `nbytes` (and, for a new key, a slot) fit."""
        free = int(self._head[_CAPACITY] - self._head[_USED]) + (int(self._nbytes[replacing]) if replacing >= 0 else 0)
        need_slot = replacing < 0 and self._head[_ENTRIES] >= self._max_entries
        deficit = nbytes - free
        if deficit <= 0 and not need_slot:
            return []
        candidates = np.flatnonzero((self._state == _LIVE) & (self._pins == 0))
        candidates = candidates[candidates != replacing]
        order = candidates[np.argsort(self._last_use[candidates], kind="stable")]
        freed = np.cumsum(self._nbytes[order])
        count = 0 if deficit <= 0 else int(np.searchsorted(freed, deficit)) + 1
        count = max(count, int(need_slot))
        return order[:count].tolist() if count <= len(order) else None

    def _rebuild(self) -> None:
        """Reinsert live slots so tombstones stop lengthening probe sequences."""
        live = self._slots[self._state == _LIVE].copy()
        self._slots[:] = np.zeros((), SLOT_DTYPE)
        for record in live:
            _, slot = self._find(record["key"].tobytes())
            self._slots[slot] = record
        self._head[_TOMBS] = 0

    # -- KVStore ---------------------------------------------------------------------------------------------------

    async def put_frame(self, key: bytes, frame: bytes | memoryview, *, replace: bool = False) -> bool:
        nbytes = len(frame)
        with self._locked():
            slot, _ = self._find(key)
            if slot >= 0 and not replace:
                self._touch(slot)
                return True
            victims = self._victims(nbytes, slot) if nbytes <= self._head[_CAPACITY] else None
            if victims is None:
                self._head[_REJECTED] += 1
                return False
            for victim in victims:
                self._remove(victim)
            self._head[_EVICTIONS] += len(victims)
            if slot >= 0:  # replace: same slot and pins, new segment
                _unlink(self._segment(slot))
                self._head[_USED] -= self._nbytes[slot]
            else:
                _, slot = self._find(key)
                if self._state[slot] == _TOMBSTONE:
                    self._head[_TOMBS] -= 1
                self._keys[slot] = np.frombuffer(key, np.uint8)
                self._pins[slot] = 0
                self._head[_ENTRIES] += 1
            self._state[slot] = _LIVE
            self._nbytes[slot] = nbytes
            self._head[_USED] += nbytes
            try:
                _write_segment(self._segment(slot), frame)
            except BaseException:
                self._remove(slot)  # e.g. /dev/shm is full: the index must not list a segment that is not there
                raise
            self._touch(slot)
            self._head[_PUTS] += 1
            if self._head[_TOMBS] > len(self._state) // 4:
                self._rebuild()
            return True

    async def get_frame(self, key: bytes, *, touch: bool = True) -> memoryview | None:
        with self._locked():
            slot, _ = self._find(key)
            if slot < 0:
                self._head[_MISSES] += touch
                return None
            if touch:
                self._head[_HITS] += 1
                self._touch(slot)
            # Mapped under the lock, so the segment cannot be unlinked before we hold it.
            return _map_read_only(self._segment(slot), int(self._nbytes[slot]))

    async def contains(self, key: bytes) -> bool:
        with self._locked():
            return self._find(key)[0] >= 0

    async def longest_prefix(self, keys: Sequence[bytes]) -> int:
        with self._locked():
            slots = []
            for key in keys:
                slot, _ = self._find(key)
                if slot < 0:
                    break
                slots.append(slot)
            for slot in reversed(slots):
                self._touch(slot)
            self._head[_HITS] += len(slots)
            self._head[_MISSES] += len(keys) - len(slots)
            return len(slots)

    async def pin(self, key: bytes) -> bool:
        with self._locked():
            slot, _ = self._find(key)
            if slot >= 0:
                self._pins[slot] += 1
            return slot >= 0

    async def unpin(self, key: bytes) -> bool:
        with self._locked():
            slot, _ = self._find(key)
            if slot < 0 or self._pins[slot] == 0:
                return False
            self._pins[slot] -= 1
            return True

    async def delete(self, key: bytes) -> bool:
        with self._locked():
            slot, _ = self._find(key)
            if slot < 0 or self._pins[slot]:
                return False
            self._remove(slot)
            return True

    async def stats(self) -> StoreStats:
        with self._locked():
            h = [int(x) for x in self._head]
            num_pinned = int(np.count_nonzero((self._state == _LIVE) & (self._pins > 0)))
        return StoreStats(capacity_bytes=h[_CAPACITY], used_bytes=h[_USED], num_entries=h[_ENTRIES],
                          num_pinned=num_pinned, hits=h[_HITS], misses=h[_MISSES], puts=h[_PUTS],
                          rejected=h[_REJECTED], evictions=h[_EVICTIONS])

    async def close(self) -> None:
        """The owner unlinks every segment (attached processes then get StoreClosed); others only unmap."""
        if self._head is None:
            return
        if self.owner:
            with self._thread_lock:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
                try:
                    for slot in np.flatnonzero(self._state == _LIVE).tolist():
                        _unlink(self._segment(slot))
                    self._head[_MAGIC_I] = 0
                    _unlink(f"{self.name}.idx")
                finally:
                    fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
        self._release()

    def _release(self) -> None:
        # numpy views export the segment's buffer; they must go before the mapping can be closed.
        self._head = self._slots = self._state = self._pins = self._nbytes = self._last_use = self._keys = None
        os.close(self._lock_fd)
        self._index.close()


def _open_segment(name: str, create: bool, size: int = 0) -> shared_memory.SharedMemory:
    """A segment whose lifetime the index manages, not Python's resource tracker (see the module docstring)."""
    try:
        return shared_memory.SharedMemory(name=name, create=create, size=size, track=False)  # Python >= 3.13
    except TypeError:
        segment = shared_memory.SharedMemory(name=name, create=create, size=size)
        resource_tracker.unregister(segment._name, "shared_memory")  # noqa: SLF001 - the name registered
        return segment


def _write_segment(name: str, frame: bytes | memoryview) -> None:
    segment = _open_segment(name, create=True, size=len(frame))
    try:
        segment.buf[:len(frame)] = frame
    finally:
        segment.close()


def _map_read_only(name: str, nbytes: int) -> memoryview:
    fd = os.open(os.path.join(SHM_DIR, name), os.O_RDONLY)
    try:
        # The view keeps the mapping alive; it is unmapped when the last view is dropped.
        return memoryview(mmap.mmap(fd, nbytes, prot=mmap.PROT_READ))
    finally:
        os.close(fd)


def _unlink(name: str) -> None:
    try:
        os.unlink(os.path.join(SHM_DIR, name))
    except FileNotFoundError:
        pass
