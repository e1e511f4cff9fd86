"""Client-side tool pauses in the verifier: the retention policy keeps, offloads or drops a paused turn's KV; the
conversation's next request finds kept KV by prefix (usage.cached_tokens) and generates what a fresh request does."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from specrelay.services.toolcoord.retention import Retention
from specrelay.services.verifier.client_retention import ClientRetention, common_prefix
from specrelay.shared.messages import CANCEL_STREAM, Cancel
from specrelay.shared.modeling.kv_cache import BlockTable, PagedKVCache
from specrelay.shared.modeling.loader import load_model
from specrelay.shared.modeling.runner import ModelRunner
from specrelay.shared.pte import PteProfile
from specrelay.shared.sampling import SamplingParams

from .test_held_service import PROMPT, TOOL_ANSWER, _with_stack, model_dir, stop_token, tokens  # noqa: F401

PROFILE = PteProfile(gamma=0.002, prefill_s_per_token=1e-4, decode_a_s=5e-4)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Finished:
    """What the engine hands over for a finished turn: its sequence, and a table with KV for all but the last."""

    prompt: list[int]
    output: list[int]
    table: BlockTable = field(default_factory=BlockTable)

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output


def retention(num_blocks=64, offload=True, **pauses_s) -> tuple[ClientRetention, PagedKVCache, Clock]:
    """A retention policy over a small cache, taught some pauses (e.g. calculator=0.02: five such pauses seen).
    The store is slow (50 MB/s, a remote one): with 256 bytes of KV per token a fast one would always win."""
    cache = PagedKVCache(num_layers=2, num_blocks=num_blocks, block_size=16, num_kv_heads=2, head_dim=8)
    clock = Clock()
    r = ClientRetention.for_cache(cache, PROFILE, offload=offload, store_bytes_per_s=5e7)
    r.clock = clock
    for tool, seconds in pauses_s.items():
        for _ in range(5):
            r.policy.observe_pause([tool], seconds)
    return r, cache, clock


def finished(cache: PagedKVCache, n: int, first: int = 1000, output_len: int = 4) -> Finished:
    req = Finished(list(range(first, first + n - output_len)), list(range(500, 500 + output_len)))
    cache.reserve(req.table, n - 1)
    req.table.num_tokens = n - 1
    return req


def test_common_prefix():
    assert common_prefix([1, 2, 3, 4], [1, 2, 3, 4, 5]) == 4
    assert common_prefix([1, 2, 3, 4], [1, 2, 9, 4]) == 2
    assert common_prefix([5], [1]) == 0 and common_prefix([], [1]) == 0


def test_a_short_pause_keeps_the_kv_and_the_next_request_claims_all_of_it():
    r, cache, clock = retention(calculator=0.02)
    req = finished(cache, 100)
    assert r.pause("t1", req, ("calculator",)) is Retention.KEEP
    assert [p.key for p in r.kept] == ["t1"]
    clock.now += 0.25
    table = r.claim(req.tokens + [11, 12, 13])
    assert table is req.table and table.num_tokens == 99
    stats = r.policy.pauses.stats["calculator"]
    assert r.kept == [] and stats.count == 6 and stats.samples[-1] == 0.25  # learned from this pause


def test_a_next_request_that_diverges_gets_the_common_prefix_only():
    r, cache, _ = retention(calculator=0.02)
    req = finished(cache, 100, output_len=40)  # a 60-token prompt, a 40-token call
    assert r.pause("t1", req, ("calculator",)) is Retention.KEEP
    assert r.claim([1, 2, 3] * 30) is None  # another conversation: not even one block in common
    assert r.claim(req.tokens[:40] + [5] * 30) is None  # the same system prompt, but not this conversation
    prompt = req.tokens[:70] + [5] * 30  # the template rendered the call differently from token 70 on
    free = cache.num_free_blocks
    table = r.claim(prompt)
    assert table.num_tokens == 70 and len(table.blocks) == 5 and cache.num_free_blocks == free + 2


def test_a_long_pause_on_a_busy_cache_offloads_or_drops():
    r, cache, _ = retention(num_blocks=16, human=120.0)
    others = BlockTable()
    cache.reserve(others, 8 * 16)  # half the cache busy with other requests
    assert r.pause("t1", finished(cache, 100), ("human",)) is Retention.OFFLOAD
    r2, cache2, _ = retention(num_blocks=16, offload=False, human=120.0)  # no kvstore: drop
    cache2.reserve(BlockTable(), 8 * 16)
    assert r2.pause("t1", finished(cache2, 100), ("human",)) is Retention.DROP
    assert r2.kept == []


def test_eviction_and_recheck_hand_back_the_requests_to_free():
    r, cache, clock = retention(calculator=0.02)
    a, b = finished(cache, 100), finished(cache, 300, first=2000)
    assert r.pause("a", a, ("calculator",)) is Retention.KEEP and r.pause("b", b, ("calculator",)) is Retention.KEEP
    out = r.evict(blocks_needed=10)
    assert [req for req, _ in out] == [b] and out[0][1] in (Retention.OFFLOAD, Retention.DROP)
    assert [p.key for p in r.kept] == ["a"]
    # b's record stays: when its conversation comes back, the pause is still learned
    clock.now += 3.0
    assert r.claim(b.tokens + [1]) is None and r.policy.pauses.stats["calculator"].samples[-1] == 3.0
    # a kept conversation whose pause outlasts its recheck is moved out
    recheck = r.kept[0].recheck_at
    assert recheck is not None
    clock.now = recheck + 1e6
    assert [req for req, _ in r.due()] == [a] and r.kept == []


async def test_the_verifier_keeps_a_paused_turn_and_the_next_request_finds_it_by_prefix(model_dir, stop_token,
                                                                                       tmp_path):
    profile_file = tmp_path / "pte.json"
    PROFILE.save(profile_file)

    async def body(stack):
        svc = stack.service
        first = await stack.generate("t1", PROMPT, stop_token, hold_s=10)
        answer = tokens(first)
        assert first[-1].holder == "v-held"
        await stack.bus.publish(CANCEL_STREAM, Cancel("t1", tool_names=["lookup"]))
        for _ in range(100):
            if not len(svc.held):
                break
            await asyncio.sleep(0.02)
        assert [p.key for p in svc.retention.kept] == ["t1"]
        assert svc.engine.runner.cache.num_free_blocks < 128  # the KV stayed on the device
        # The client ran its tool and sends the whole conversation with the answer appended.
        sequence = PROMPT + answer + TOOL_ANSWER
        second = await stack.generate("t2", sequence, stop_token, max_tokens=6)
        assert svc.engine.runner.cache.num_free_blocks == 128 and svc.retention.kept == []
        assert svc.retention.policy.pauses.stats["lookup"].count == 1
        return answer, tokens(second), second[-1].usage

    # No kvstore: whatever is cached came from the kept table.
    answer, continued, usage = await _with_stack(model_dir, body, prefix_caching=False,
                                                 pte_profile=str(profile_file))
    assert usage.cached_tokens == len(PROMPT) + len(answer) - 1  # all but the stop token, never fed
    assert usage.pte.prefill == len(TOOL_ANSWER) + 1 and usage.pte.recompute == 0
    sequence = PROMPT + answer + TOOL_ANSWER
    fresh = ModelRunner(load_model(model_dir), num_blocks=64).generate(
        [sequence], SamplingParams(max_tokens=6, stop_token_ids=(stop_token,)))[0]
    assert continued == fresh


async def test_a_kept_turn_is_evicted_when_a_new_request_needs_its_blocks(model_dir, stop_token, tmp_path):
    profile_file = tmp_path / "pte.json"
    PROFILE.save(profile_file)

    async def body(stack):
        svc = stack.service
        for _ in range(5):  # lookups come back within a millisecond: worth keeping even in a small cache
            svc.retention.policy.observe_pause(["lookup"], 0.001)
        await stack.generate("k1", PROMPT, stop_token, hold_s=10)
        await stack.bus.publish(CANCEL_STREAM, Cancel("k1", tool_names=["lookup"]))
        for _ in range(100):
            if svc.retention.kept:
                break
            await asyncio.sleep(0.02)
        assert [p.key for p in svc.retention.kept] == ["k1"]
        big = [(7 * i) % 90 + 3 for i in range(200)]  # 200 tokens: 14 of the 16 blocks with the step's room
        done = await stack.generate("k2", big, stop_token, max_tokens=2)
        assert done[-1].finish_reason in ("stop", "length") and done[-1].error is None
        assert svc.retention.kept == [] and svc.engine.runner.cache.num_free_blocks == 16

    await _with_stack(model_dir, body, prefix_caching=False, pte_profile=str(profile_file), num_blocks=16)
