"""A drafter that starts on a backlog (restarted, or taking over a dead one's) answers what is asked now: draft
batches older than --max-batch-age-s, whose verifier stopped waiting long ago, are acknowledged undrafted (issue 18,
defect 7)."""

from __future__ import annotations

import asyncio

import pytest

from specrelay.services.drafter.recycling import TokenRecyclingProposer
from specrelay.services.drafter.service import Drafter, serve_drafter
from specrelay.shared.bus import BusConfig, make_bus
from specrelay.shared.messages import DRAFT_STREAM, DraftBatch, DraftItem, DraftReply, SamplingSpec


def batch(step_id: int, reply_to: str) -> DraftBatch:
    return DraftBatch(step_id, reply_to, [DraftItem(f"r{step_id}", [1, 2, 3], SamplingSpec(), 4)])


@pytest.mark.parametrize("transport", ["local", "redis"])
async def test_a_drafter_skips_a_stale_backlog_and_drafts_what_is_asked_now(transport, redis_url, redis_prefix):
    bus = make_bus(redis_url if transport == "redis" else None, BusConfig(prefix=redis_prefix, block_ms=20))
    async with bus:
        replies = bus.open_reply_channel(DraftReply)
        for step in range(1, 51):  # a backlog nobody drafted: the drafter was down
            await bus.publish(DRAFT_STREAM, batch(step, replies.name))
        await asyncio.sleep(0.5)
        task = asyncio.create_task(serve_drafter(bus, Drafter(TokenRecyclingProposer(101)), "d0",
                                                 max_batch_age_s=0.3))
        try:
            await bus.publish(DRAFT_STREAM, batch(51, replies.name))
            reply = await replies.get(timeout_s=30)
            assert reply.step_id == 51  # the first answer is to what was asked now, not to the backlog
            with pytest.raises(TimeoutError):
                await replies.get(timeout_s=0.5)
            assert not task.done()
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
