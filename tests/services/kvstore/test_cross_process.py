"""A second process on the machine reads what the first wrote, and the first reads what the second wrote: the
shared-memory store (attached by name) and the Redis store (same URL and prefix)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import uuid

import pytest
import torch

from specrelay.services.kvstore import block_hashes, make_store

SHAPE = (2, 2, 4, 2, 8)


def block(seed: int) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


CHILD = textwrap.dedent("""
    import asyncio, sys, torch
    from specrelay.services.kvstore import block_hashes, make_store

    def block(seed):
        return torch.randn({shape}, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)

    async def main():
        store = {open_store}
        hashes = block_hashes("m", list(range(12)), 4)
        print("prefix", await store.longest_prefix(hashes))
        print("equal", all(torch.equal(kv, block(i)) for i, kv in enumerate(await store.get_prefix(hashes))))
        print("pinned", await store.pin(hashes[0]))
        print("stored", await store.put_block(hashes[2], block(2)))
        await store.close()

    asyncio.run(main())
""")


def run_child(open_store: str) -> dict[str, str]:
    script = CHILD.format(shape=SHAPE, open_store=open_store)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "leaked" not in proc.stderr  # Python's resource tracker must not own (and unlink) our segments
    return dict(line.split() for line in proc.stdout.splitlines())


@pytest.mark.parametrize("backend", ["shm", "redis"])
async def test_two_processes_share_blocks(backend, request):
    if backend == "shm":
        name = f"srtest-{uuid.uuid4().hex[:12]}"
        store = make_store(f"shm://{name}", 1 << 20)
        open_store = f"make_store('shm://{name}', attach=True)"
    else:
        url, prefix = request.getfixturevalue("redis_url"), request.getfixturevalue("redis_prefix")
        store = make_store(url, 1 << 20, prefix=prefix)
        open_store = f"make_store({url!r}, 1 << 20, prefix={prefix!r})"
    hashes = block_hashes("m", list(range(12)), 4)
    try:
        await store.put_blocks(hashes[:2], [block(0), block(1)])
        child = run_child(open_store)
        assert child == {"prefix": "2", "equal": "True", "pinned": "True", "stored": "True"}
        assert await store.longest_prefix(hashes) == 3  # the child's block 2 completes the chain here
        assert torch.equal(await store.get_block(hashes[2]), block(2))
        stats = await store.stats()
        assert (stats.num_entries, stats.num_pinned, stats.puts) == (3, 1, 3)  # counters are shared, not per process
        assert not await store.delete(hashes[0])  # the child's pin holds
    finally:
        if backend == "redis":
            await store.clear()
        await store.close()
    if backend == "shm":
        assert [e for e in os.listdir("/dev/shm") if e.startswith(name)] == []
