"""The paged KV cache: one pool of fixed-size blocks per model, and a block table per sequence.

Slot of (block b, offset o) = b·block_size + o; a sequence's logical position p lives in block
`table.blocks[p // block_size]` at offset `p % block_size`. Blocks are reference-counted so that sequences can share
a prefix (fork) and copy a block before writing into a shared one (copy-on-write). Allocation is plain Python;
only `PagedKVCache` touches tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from specrelay.kernels.dispatch import runtime_uses_triton
from specrelay.kernels.kv_compact import kv_compact_triton_
from specrelay.shared.errors import SpecrelayError


class OutOfBlocks(SpecrelayError):
    """The cache has no free block left for this request."""


class BlockAllocator:
    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self.free_blocks = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first

    @property
    def num_free(self) -> int:
        return len(self.free_blocks)

    def allocate(self) -> int:
        if not self.free_blocks:
            raise OutOfBlocks(f"KV cache full: all {self.num_blocks} blocks are in use")
        block = self.free_blocks.pop()
        self.ref_counts[block] = 1
        return block

    def share(self, block: int) -> int:
        assert self.ref_counts[block] > 0, f"block {block} is free"
        self.ref_counts[block] += 1
        return block

    def free(self, block: int) -> None:
        assert self.ref_counts[block] > 0, f"block {block} freed twice"
        self.ref_counts[block] -= 1
        if self.ref_counts[block] == 0:
            self.free_blocks.append(block)


@dataclass
class BlockTable:
    """A sequence's blocks and how many of its tokens hold valid KV."""

    blocks: list[int] = field(default_factory=list)
    num_tokens: int = 0


class PagedKVCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        shape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # [num_layers, num_blocks, block_size, H_kv, D]
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.block_size = block_size
        self.allocator = BlockAllocator(num_blocks)

    @property
    def num_free_blocks(self) -> int:
        return self.allocator.num_free

    def bytes_per_block(self) -> int:
        return 2 * self.k[:, 0].numel() * self.k.element_size()

    def reserve(self, table: BlockTable, num_new_tokens: int) -> list[int]:
        """Make room for `num_new_tokens` after `table.num_tokens` and return their slots (the caller writes them
        and then advances `num_tokens`). A shared last block is copied first, so writes never leak into a sibling."""
        start, end = table.num_tokens, table.num_tokens + num_new_tokens
        bs = self.block_size
        if start % bs and table.blocks:
            last = start // bs
            if self.allocator.ref_counts[table.blocks[last]] > 1:
                table.blocks[last] = self.copy_block(table.blocks[last])
        needed = -(-end // bs) - len(table.blocks)
        if needed > self.allocator.num_free:
            raise OutOfBlocks(f"KV cache full: {needed} blocks needed, {self.allocator.num_free} free")
        for _ in range(max(0, needed)):
            table.blocks.append(self.allocator.allocate())
        return [table.blocks[p // bs] * bs + p % bs for p in range(start, end)]

    def fork(self, table: BlockTable) -> BlockTable:
        """A new table sharing every block of `table` (a prefix hit, or n > 1 samples)."""
        return BlockTable([self.allocator.share(b) for b in table.blocks], table.num_tokens)

    def truncate(self, table: BlockTable, num_tokens: int) -> None:
        """Keep the first `num_tokens` tokens (roll back rejected speculation) and free the blocks past them."""
        assert 0 <= num_tokens <= table.num_tokens
        keep = -(-num_tokens // self.block_size)
        for block in table.blocks[keep:]:
            self.allocator.free(block)
        del table.blocks[keep:]
        table.num_tokens = num_tokens

    def release(self, table: BlockTable) -> None:
        self.truncate(table, 0)

    def copy_block(self, src: int) -> int:
        """A private copy of block `src` (all layers, K and V); drops one reference to `src`."""
        dst = self.allocator.allocate()
        self.k[:, dst].copy_(self.k[:, src])
        self.v[:, dst].copy_(self.v[:, src])
        self.allocator.free(src)
        return dst

    def move_slots(self, src_slots: list[int], dst_slots: list[int]) -> None:
        """Copy every layer's K/V from src to dst slots (KV compaction after tree acceptance). Overlap is safe:
        the sources are read in full before any destination is written."""
        if not src_slots:
            return
        src = torch.tensor(src_slots, device=self.k.device)
        dst = torch.tensor(dst_slots, device=self.k.device)
        if runtime_uses_triton(self.k):
            kv_compact_triton_(self.k, self.v, src, dst)
            return
        for cache in (self.k, self.v):
            flat = cache.view(cache.shape[0], -1, *cache.shape[3:])  # [num_layers, num_slots, H_kv, D]
            flat[:, dst] = flat[:, src]
