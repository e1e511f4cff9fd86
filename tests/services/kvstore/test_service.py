"""`specrelay kvstore`: the keeper holds a shared Redis store to its capacity (least recently used first, pins kept)
and shows the store on /health and /metrics."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

from specrelay.services.kvstore import block_hashes, make_store
from specrelay.services.kvstore.service import KeeperConfig, StoreKeeper, create_app, parse_bytes


def _block(seed: int) -> torch.Tensor:
    # [num_layers, 2, block_size, num_kv_heads, head_dim]
    return torch.full((2, 2, 4, 2, 8), float(seed))


@pytest.fixture
async def filled(redis_url, redis_prefix):
    """A store under a private prefix holding one 8-block chain, written by a verifier allowed a large capacity."""
    store = make_store(redis_url, 1 << 20, prefix=redis_prefix)
    hashes = block_hashes("model", list(range(32)), 4)
    await store.put_blocks(hashes, [_block(i) for i in range(len(hashes))])
    yield store, hashes
    await store.clear()
    await store.close()


async def _keeper(redis_url, redis_prefix, capacity_bytes):
    return StoreKeeper(KeeperConfig(redis_url, capacity_bytes, prefix=redis_prefix))


async def test_trim_evicts_the_chain_tail_down_to_capacity_and_keeps_pins(filled, redis_url, redis_prefix):
    store, hashes = filled
    before = await store.stats()
    frame_bytes = before.used_bytes // len(hashes)
    assert await store.pin(hashes[-1])  # a pinned tail block survives any trim
    keeper = await _keeper(redis_url, redis_prefix, capacity_bytes=4 * frame_bytes)
    try:
        assert await keeper.trim() == 4
        assert await keeper.trim() == 0  # nothing more to do once it fits
    finally:
        await keeper.close()
    after = await store.stats()
    assert after.used_bytes == 4 * frame_bytes and after.num_entries == 4
    assert after.evictions == before.evictions + 4
    # the chain is evicted from the tail (least recently used), so the head is still a usable prefix
    assert await store.longest_prefix(hashes) == 3
    assert [await store.contains(h) for h in hashes] == [True] * 3 + [False] * 4 + [True]
    assert torch.equal(await store.get_block(hashes[0]), _block(0))


async def test_all_pinned_store_stays_over_capacity(filled, redis_url, redis_prefix):
    store, hashes = filled
    for h in hashes:
        assert await store.pin(h)
    keeper = await _keeper(redis_url, redis_prefix, capacity_bytes=1)
    try:
        assert await keeper.trim() == 0
    finally:
        await keeper.close()
    assert (await store.stats()).num_entries == len(hashes)


async def test_health_and_metrics_show_the_store(filled, redis_url, redis_prefix):
    from aiohttp.test_utils import TestClient, TestServer

    store, hashes = filled
    keeper = await _keeper(redis_url, redis_prefix, capacity_bytes=1 << 20)
    client = TestClient(TestServer(create_app(keeper)))
    await client.start_server()
    try:
        await store.longest_prefix(hashes[:2] + [b"\0" * 32])  # 2 hits, 1 miss
        r = await client.get("/health")
        assert r.status == 200
        body = await r.json()
        assert body["status"] == "ok" and body["store"]["num_entries"] == len(hashes)
        assert body["store"]["capacity_bytes"] == 1 << 20
        text = await (await client.get("/metrics")).text()
        values = dict(re.findall(r"^(specrelay_kvstore_\w+) (\d+)\.0$", text, re.MULTILINE))
        assert values["specrelay_kvstore_num_entries"] == str(len(hashes))
        assert values["specrelay_kvstore_hits_total"] == "2" and values["specrelay_kvstore_misses_total"] == "1"
        assert values["specrelay_kvstore_used_bytes"] == str((await store.stats()).used_bytes)
    finally:
        await client.close()
        await keeper.close()


async def test_health_is_503_when_redis_is_away():
    from aiohttp.test_utils import TestClient, TestServer

    keeper = StoreKeeper(KeeperConfig("redis://127.0.0.1:1/0", 1 << 20))
    client = TestClient(TestServer(create_app(keeper)))
    await client.start_server()
    try:
        r = await client.get("/health")
        assert r.status == 503 and (await r.json())["status"] == "unavailable"
    finally:
        await client.close()
        await keeper.close()


@pytest.mark.parametrize("text, expected", [("2G", 2 << 30), ("512M", 512 << 20), ("64KiB", 64 << 10), ("100", 100)])
def test_capacity_sizes(text, expected):
    assert parse_bytes(text) == expected


def test_the_command_refuses_a_missing_redis_or_a_bad_size():
    def run(*args):
        env = {k: v for k, v in os.environ.items() if not k.startswith("SPECRELAY_")}
        return subprocess.run([sys.executable, "-m", "specrelay", "kvstore", *args], capture_output=True,
                              text=True, timeout=60, env=env)

    out = run()
    assert out.returncode == 2 and "needs --redis URL" in out.stderr
    out = run("--redis", "redis://127.0.0.1:1/0", "--capacity", "lots")
    assert out.returncode == 2 and "capacity 'lots'" in out.stderr
