"""Prefix reuse through the kvstore: a request's full KV blocks are published under a hash chain of
(model id, token ids) when it finishes, and a later prompt that starts with the same tokens loads them instead of
prefilling them. The next turn of a conversation — the last prompt, the answer, a tool result — is the common case.

The last prompt token is never loaded: its forward yields the logits of the first new token.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from specrelay.services.kvstore import block_hashes
from specrelay.services.kvstore.store import KVStore
from specrelay.shared.modeling.kv_cache import BlockTable, PagedKVCache


def model_id(model_dir: str | Path, dtype: torch.dtype) -> str:
    """Names everything that changes the KV: the config, the weights (by size), the KV dtype."""
    model_dir = Path(model_dir)
    digest = hashlib.blake2b((model_dir / "config.json").read_bytes(), digest_size=8).hexdigest()
    weights = sum(p.stat().st_size for p in sorted(model_dir.glob("*.safetensors")))
    return f"{model_dir.resolve().name}:{digest}:{weights}:{str(dtype).removeprefix('torch.')}"


class PrefixCache:
    def __init__(self, store: KVStore, model_id: str, cache: PagedKVCache):
        self.store, self.model_id, self.cache = store, model_id, cache

    async def load(self, table: BlockTable, prompt: list[int]) -> int:
        """Fill `table` (empty) with the longest cached prefix of `prompt`; returns the tokens loaded."""
        bs = self.cache.block_size
        hashes = block_hashes(self.model_id, prompt[: len(prompt) - 1], bs)
        if not hashes or not await self.store.longest_prefix(hashes):
            return 0
        kvs = await self.store.get_prefix(hashes)  # list of [num_layers, 2, block_size, H_kv, D]
        if not kvs:
            return 0
        slots = self.cache.reserve(table, len(kvs) * bs)
        for i, kv in enumerate(kvs):
            block = slots[i * bs] // bs
            self.cache.k[:, block].copy_(kv[:, 0])
            self.cache.v[:, block].copy_(kv[:, 1])
        table.num_tokens = len(kvs) * bs
        return table.num_tokens

    async def save(self, table: BlockTable, tokens: list[int]) -> None:
        """Publish the full blocks of `tokens` whose KV `table` holds (all but the last token's, at most)."""
        bs = self.cache.block_size
        hashes = block_hashes(self.model_id, tokens[: table.num_tokens], bs)
        if not hashes:
            return
        known = await self.store.longest_prefix(hashes)
        if known == len(hashes):
            return
        kvs = [torch.stack((self.cache.k[:, table.blocks[i]], self.cache.v[:, table.blocks[i]]), dim=1)
               for i in range(known, len(hashes))]
        await self.store.put_blocks(hashes[known:], kvs)
