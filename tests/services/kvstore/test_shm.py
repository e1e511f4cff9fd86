"""The shared-memory backend's own promises: no segment outlives the owner's close, attachers are told when the
owner has gone, a crashed owner's leftovers can be removed, and the shared hash table stays exact under churn."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import uuid

import pytest

from specrelay.services.kvstore import span_key
from specrelay.services.kvstore.local import LocalStore
from specrelay.services.kvstore.shm import ShmStore, StoreClosed
from specrelay.shared.errors import ConfigError


def segments(name: str) -> list[str]:
    return sorted(e for e in os.listdir("/dev/shm") if e.startswith(f"{name}."))


@pytest.fixture
def name():
    name = f"srtest-{uuid.uuid4().hex[:12]}"
    yield name
    leftover = segments(name)
    ShmStore.destroy(name)
    assert leftover == [], f"leaked shared memory: {leftover}"


async def test_close_unlinks_every_segment_and_attachers_learn_the_store_is_gone(name):
    owner = ShmStore(name, 1 << 16)
    for i in range(5):
        await owner.put_frame(span_key(i), bytes([i]) * 100)
    reader = ShmStore.attach(name)
    assert await reader.get_frame(span_key(3)) == bytes([3]) * 100
    await reader.close()  # an attacher only unmaps
    assert len(segments(name)) == 6  # the index and five entries

    reader = ShmStore.attach(name)
    await owner.close()
    assert segments(name) == []
    with pytest.raises(StoreClosed, match="closed by its owner"):
        await reader.put_frame(span_key(9), b"x" * 10)
    await reader.close()


async def test_names_are_exclusive_and_must_exist_to_attach(name):
    with pytest.raises(ConfigError, match="no shm store named"):
        ShmStore.attach(name)
    store = ShmStore(name, 1 << 16)
    with pytest.raises(ConfigError, match="already exists"):
        ShmStore(name, 1 << 16)
    with pytest.raises(ConfigError, match="letters, digits"):
        ShmStore("../etc", 1 << 16)
    await store.close()


async def test_a_crashed_owners_segments_are_removed_by_destroy(name):
    script = (
        "import asyncio, os\n"
        "from specrelay.services.kvstore import span_key\n"
        "from specrelay.services.kvstore.shm import ShmStore\n"
        f"store = ShmStore({name!r}, 1 << 16)\n"
        "asyncio.run(store.put_frame(span_key('a'), b'x' * 64))\n"
        "os._exit(0)\n"  # no close(): what a crash leaves behind
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
    assert len(segments(name)) == 2
    with pytest.raises(ConfigError, match="ShmStore.destroy"):
        ShmStore(name, 1 << 16)
    assert ShmStore.destroy(name) == 2


async def test_the_entry_limit_evicts_like_the_byte_limit(name):
    store = ShmStore(name, 1 << 20, max_entries=2)
    for i in range(3):
        assert await store.put_frame(span_key(i), b"v" * 10)
    assert [await store.contains(span_key(i)) for i in range(3)] == [False, True, True]
    assert (await store.stats()).evictions == 1
    await store.close()


async def test_the_shared_table_matches_the_in_process_store_under_churn(name):
    """Random puts, gets, pins and deletes on both backends: same contents, same counters. Eviction fills the
    small table with tombstones, so probing past them and rebuilding the table are exercised many times."""
    capacity = 6 * 100
    shm, ref = ShmStore(name, capacity, max_entries=12), LocalStore(capacity)  # never the binding limit
    rng = random.Random(0)
    keys = [span_key(i) for i in range(20)]
    for _ in range(600):
        key, op = rng.choice(keys), rng.random()
        if op < 0.5:
            value = bytes([rng.randrange(256)]) * rng.choice((50, 100))
            assert await shm.put_frame(key, value) == await ref.put_frame(key, value)
        elif op < 0.7:
            got = await shm.get_frame(key)
            assert (None if got is None else bytes(got)) == await ref.get_frame(key)
        elif op < 0.8:
            assert await shm.pin(key) == await ref.pin(key)
        elif op < 0.9:
            assert await shm.unpin(key) == await ref.unpin(key)
        else:
            assert await shm.delete(key) == await ref.delete(key)
    assert [await shm.contains(k) for k in keys] == [await ref.contains(k) for k in keys]
    assert await shm.stats() == await ref.stats()
    await shm.close()
