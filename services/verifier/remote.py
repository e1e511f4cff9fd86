"""The verifier's side of the drafter service: one DraftBatch per step, the reply awaited with a deadline.

A reply that misses the deadline is dropped (its step id is stale by then) and the step verifies root-only trees,
i.e. plain decoding: a slow or dead drafter costs speed, never correctness. So does a bus that cannot take the
request: drafting is skipped for the step, feedback for the step is dropped.
"""

from __future__ import annotations

import asyncio
import logging

import torch

from specrelay.services.drafter.base import DraftInput, Verified
from specrelay.shared.bus import Bus, BusUnavailable
from specrelay.shared.draft_tree import DraftTree
from specrelay.shared.messages import (
    DRAFT_STREAM,
    DraftBatch,
    DraftFeedback,
    DraftItem,
    DraftReply,
    FeedbackItem,
)
from specrelay.shared.sampling_wire import spec_from_params
from specrelay.shared.wire import WireTensor

log = logging.getLogger(__name__)


class RemoteDrafter:
    def __init__(self, bus: Bus, timeout_s: float = 0.5):
        self.bus = bus
        self.timeout_s = timeout_s
        self.channel = bus.open_reply_channel(DraftReply)
        self.step_id = 0
        self.timeouts = 0
        self.wants_hidden = False  # the drafter's replies say whether its proposer reads the target's hidden states

    async def propose(self, inputs: list[DraftInput], names: dict[int, str]) -> list[DraftTree] | None:
        self.step_id += 1
        items = [DraftItem(names[i.request_id], i.tokens, spec_from_params(i.params), i.max_nodes, i.num_prompt_tokens,
                           positional_seed=i.positional_seed)
                 for i in inputs]
        try:
            await self.bus.publish(DRAFT_STREAM, DraftBatch(self.step_id, self.channel.name, items))
        except BusUnavailable as e:
            log.warning("verifier: no draft this step: %s", e)
            return None
        try:
            async with asyncio.timeout(self.timeout_s):
                while (reply := await self.channel.get()) is not None and reply.step_id != self.step_id:
                    pass  # a late reply to a step that already went ahead without it
        except TimeoutError:
            self.timeouts += 1
            return None
        if reply is None:  # channel closed: shutting down
            return None
        self.wants_hidden = reply.wants_hidden
        by_name = {t.request_id: t for t in reply.trees}
        trees = []
        for item in items:
            t = by_name.get(item.request_id)
            if t is None:
                return None
            q = None if t.q is None else t.q.to_torch(copy=True)
            trees.append(DraftTree(t.tokens, t.parents, t.draft_probs, q, sources=t.sources))
        return trees

    async def feedback(self, verified: list[Verified], names: dict[int, str], released: list[str]) -> None:
        items = [FeedbackItem(names[v.request_id], v.tree.tokens, v.accepted_nodes,
                              WireTensor.from_torch(v.target_topk.to(torch.int64).contiguous()),
                              WireTensor.from_torch(v.hidden.to(torch.float16).contiguous())
                              if self.wants_hidden and v.hidden is not None else None)
                 for v in verified if v.request_id in names]
        if items or released:
            try:
                await self.bus.publish(DRAFT_STREAM, DraftFeedback(items, released))
            except BusUnavailable as e:  # worse drafts for these requests, never wrong output
                log.warning("verifier: draft feedback dropped: %s", e)

    def close(self) -> None:
        self.channel.close()
