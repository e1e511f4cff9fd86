"""A store of each backend for the kvstore tests; shared-memory stores are checked for leaked segments."""

from __future__ import annotations

import os
import uuid

import pytest

from specrelay.services.kvstore import make_store


def shm_segments(name: str) -> list[str]:
    return sorted(e for e in os.listdir("/dev/shm") if e.startswith(f"{name}."))


@pytest.fixture(params=["local", "shm", "redis"])
async def make(request):
    """make(capacity_bytes) -> a fresh store of the parametrised backend."""
    stores, names = [], []

    def factory(capacity_bytes: int):
        if request.param == "local":
            store = make_store(None, capacity_bytes)
        elif request.param == "shm":
            names.append(f"srtest-{uuid.uuid4().hex[:12]}")
            store = make_store(f"shm://{names[-1]}", capacity_bytes)
        else:
            store = make_store(request.getfixturevalue("redis_url"), capacity_bytes,
                               prefix=f"{request.getfixturevalue('redis_prefix')}{len(stores)}:")
        stores.append(store)
        return store

    factory.backend = request.param
    factory.names = names
    yield factory
    for store in stores:
        if request.param == "redis":
            await store.clear()
        await store.close()
    for name in names:
        assert shm_segments(name) == [], "the owner's close() must unlink every segment"
