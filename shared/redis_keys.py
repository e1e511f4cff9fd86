"""Every Redis key specrelay writes, in one place. All live under one prefix (`DEFAULT_PREFIX`, or a deployment's
own; each test takes a fresh one):

  {prefix}stream:{name}        a work stream of the bus (XADD ... MAXLEN ~ maxlen), read by consumer groups
  {prefix}stream:{name}.dead   its dead letters: messages no consumer could decode or finish, kept for inspection
  {prefix}reply:{inbox}        the reply stream of one bus instance (one gateway process)
  {prefix}{kv}:e:<hex key>     a frame of the KV store
  {prefix}{kv}:size            hash  hex key -> frame bytes (also the index of what exists)
  {prefix}{kv}:lru             zset  hex key -> logical clock of its last use
  {prefix}{kv}:pins            hash  hex key -> pin count (absent when unpinned)
  {prefix}{kv}:meta            hash  used bytes, clock, hits, misses, puts, rejected, evictions

Cluster note: a stream is one key, so streams spread over cluster slots; the `{kv}` hash tag keeps the whole store
in one slot, which its Lua scripts need (a store too big for one node wants several prefixes, one per model).
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_PREFIX = "specrelay:"


def work_stream(prefix: str, name: str) -> str:
    return f"{prefix}stream:{name}"


def dead_letters(stream_key: str) -> str:
    """The dead-letter stream of the work stream `stream_key` (a key from `work_stream`)."""
    return stream_key + ".dead"


def reply_stream(prefix: str, inbox: str) -> str:
    return f"{prefix}reply:{inbox}"


@dataclass(frozen=True)
class StoreKeys:
    """The KV store's keys under one prefix."""

    meta: str
    size: str
    lru: str
    pins: str
    entry_prefix: str  # + the entry's hex key

    @classmethod
    def under(cls, prefix: str) -> StoreKeys:
        base = f"{prefix}{{kv}}:"
        return cls(base + "meta", base + "size", base + "lru", base + "pins", base + "e:")

    @property
    def accounting(self) -> list[str]:
        """meta, size, lru, pins: the KEYS every store script takes first."""
        return [self.meta, self.size, self.lru, self.pins]

    def entry(self, hex_key: str) -> str:
        return self.entry_prefix + hex_key
