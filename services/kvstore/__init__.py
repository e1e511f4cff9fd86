"""The KV block store: prefix-hashed KV blocks and relayed spans, byte capacity with LRU eviction, pins.

    store = make_store(None, capacity_bytes=2 << 30)                    # in-process (the embedded default)
    store = make_store("shm://specrelay-kv", capacity_bytes=...)        # this machine's processes (owner)
    store = make_store("shm://specrelay-kv", attach=True)               # ... another process on the machine
    store = make_store("redis://host:6379/0", capacity_bytes=..., prefix="specrelay:")

    hashes = block_hashes(model_id, prompt_ids, block_size)
    cached = await store.get_prefix(hashes, device="cuda")                # [num_layers, 2, block_size, H_kv, D] each
    await store.put_blocks(hashes[len(cached):], new_blocks)
"""

from __future__ import annotations

from specrelay.services.kvstore.index import KEY_BYTES, block_hashes, model_root, span_key
from specrelay.services.kvstore.store import KVStore, StoreStats
from specrelay.shared.errors import ConfigError
from specrelay.shared.redis_keys import DEFAULT_PREFIX

__all__ = ["KEY_BYTES", "KVStore", "StoreStats", "block_hashes", "make_store", "model_root", "span_key"]


def make_store(url: str | None, capacity_bytes: int | None = None, *, prefix: str = DEFAULT_PREFIX,
               attach: bool = False) -> KVStore:
    """None or "local" -> in-process; "shm://NAME" -> shared memory (creates and owns NAME unless `attach`);
    "redis://..." -> Redis under `prefix`."""
    if url is None or url == "local":
        from specrelay.services.kvstore.local import LocalStore

        return LocalStore(_need_capacity(capacity_bytes, url))
    if url.startswith("shm://"):
        from specrelay.services.kvstore.shm import ShmStore

        name = url.removeprefix("shm://")
        return ShmStore.attach(name) if attach else ShmStore(name, _need_capacity(capacity_bytes, url))
    if url.startswith(("redis://", "rediss://", "unix://")):
        from specrelay.services.kvstore.redis_backend import RedisStore

        return RedisStore(url, _need_capacity(capacity_bytes, url), prefix=prefix)
    raise ConfigError(f"kvstore URL {url!r}: expected nothing (in-process), shm://NAME or redis://host:port/db")


def _need_capacity(capacity_bytes: int | None, url: str | None) -> int:
    if capacity_bytes is None or capacity_bytes < 1:
        raise ConfigError(f"kvstore {url or 'local'}: give a positive capacity in bytes, got {capacity_bytes}")
    return capacity_bytes
