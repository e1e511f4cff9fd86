"""The message bus: one interface, two transports (local asyncio queues here; Redis Streams in bus_redis.py).

Work queues (`publish` / `consume`) follow Redis Streams semantics on both transports, so a service behaves the same
embedded or distributed:
- a stream is a log: entries every group has acknowledged are trimmed (every `trim_interval_ms`), and `maxlen`
  bounds what a group that stops reading can leave behind;
- every consumer *group* sees every message; within a group each message goes to one consumer;
- delivery is at-least-once: a message stays pending until its handler calls `await delivery.ack()` after the work
  is done. A live consumer holds a *lease* on what it was handed and has not acknowledged: the bus renews it every
  `min_idle_ms / 3` however long the handler runs, and never hands the message to another consumer meanwhile. A
  consumer that dies (or stops consuming) holding messages loses them to a live consumer of the group once they
  have been idle for `min_idle_ms` (XAUTOCLAIM). A restarted consumer with the same name first gets its own
  pending messages back. So a handler may see a message twice only after a crash or an outage of the bus: handlers
  are idempotent by the message's own id (the verifier's request id), not by the bus's;
- a message delivered `max_deliveries` times without an ack (it crashes every handler) or that does not decode as
  the consumer's type is moved to the dead-letter stream `<stream>.dead` and acknowledged, so it cannot block the
  group forever;
- a consumer unseen for `stale_consumer_ms` with nothing pending is pruned from its group, and a group whose every
  consumer is that stale no longer holds back trimming (a killed replica's own Cancel group);
- streams and groups stay until deleted: a service that names one for itself (a verifier replica's Continue stream,
  its own Cancel group) deletes it when it stops (`delete_stream`, `delete_group`), never one another service reads.
Reply channels (`open_reply_channel` / `reply`) stream results back to one waiting caller (the gateway's per-request
token stream): ordered, one reader, no redelivery. See bus_redis.py for why they are streams and not pub/sub.

Redis going away is not an error a service sees at once: every call retries with backoff for `retry_s`, consumers
recreate their groups when a restarted Redis has lost them, and only then does a call raise `BusUnavailable`.
`Bus.resets` counts the restarts that lost the bus's data, so a caller waiting on work it published can tell that
its message may be gone (the gateway republishes a request nobody has started; generation.py).

Messages are msgspec Structs encoded as msgpack, also on the local transport: what works embedded works over Redis,
and a consumer never shares a mutable object with its producer. Tensors travel as `wire.WireTensor` fields.
"""

from __future__ import annotations

from specrelay.shared.bus_interface import (
    Bus, BusConfig, BusUnavailable, Delivery, ReplyChannel, decode_or_none,
)
from specrelay.shared.bus_local import LocalBus
from specrelay.shared.errors import ConfigError

__all__ = ["Bus", "BusConfig", "BusUnavailable", "Delivery", "LocalBus", "ReplyChannel", "decode_or_none", "make_bus"]


def make_bus(url: str | None, config: BusConfig | None = None) -> Bus:
    """None -> the in-process bus; redis://... or rediss://... -> Redis Streams."""
    config = config or BusConfig()
    if url is None or url == "local":
        return LocalBus(config)
    if url.startswith(("redis://", "rediss://", "unix://")):
        from specrelay.shared.bus_redis import RedisBus

        return RedisBus(url, config)
    raise ConfigError(f"bus URL {url!r}: expected redis://host:port/db, or nothing for the in-process bus")
