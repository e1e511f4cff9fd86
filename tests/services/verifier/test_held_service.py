"""The verifier holds a finished request's KV when asked (Generate.hold_s), continues it on a Continue with only the
new tokens prefilled, answers a late Continue with an error, and frees a held request on Cancel or expiry.
usage.pte adds up the turns."""

from __future__ import annotations

import asyncio

import pytest
import torch

from specrelay.services.verifier.service import VerifierConfig, VerifierService
from specrelay.shared.bus import make_bus
from specrelay.shared.messages import (
    CANCEL_STREAM,
    GENERATE_STREAM,
    Cancel,
    Continue,
    Generate,
    SamplingSpec,
    TokenChunk,
    continue_stream,
)
from specrelay.shared.modeling.runner import ModelRunner
from specrelay.shared.pte import PteProfile, TurnTokens, trajectory_pte
from specrelay.shared.sampling import SamplingParams

from ...conftest import save_tiny_llama

PROMPT = torch.randint(0, 101, (37,), generator=torch.Generator().manual_seed(3)).tolist()
TOOL_ANSWER = [9, 4, 77, 31, 2, 65, 18, 40, 12, 3, 88]
PROFILE = PteProfile(gamma=0.002, prefill_s_per_token=1e-4, decode_a_s=5e-4)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("held"), seed=11)


@pytest.fixture(scope="module")
def stop_token(model_dir) -> int:
    """A token the model emits greedily a few tokens into its answer to PROMPT: the first turn ends by it."""
    from specrelay.shared.modeling.loader import load_model

    out = ModelRunner(load_model(model_dir), num_blocks=64).generate([PROMPT], SamplingParams(max_tokens=8))[0]
    return out[5]


async def _turn(channel) -> list[TokenChunk]:
    chunks = []
    while not chunks or (chunks[-1].finish_reason is None and chunks[-1].error is None):
        chunks.append(await asyncio.wait_for(channel.get(), 60))
    return chunks


class Stack:
    def __init__(self, service, bus, channel):
        self.service, self.bus, self.channel = service, bus, channel

    async def generate(self, rid, prompt, stop, hold_s=0.0, max_tokens=12) -> list[TokenChunk]:
        sampling = SamplingSpec(max_tokens=max_tokens, stop_token_ids=[stop])
        await self.bus.publish(GENERATE_STREAM, Generate(rid, prompt, sampling, self.channel.name, hold_s=hold_s))
        return await _turn(self.channel)

    async def resume(self, holder, rid, tokens, hold_s=0.0, max_tokens=10) -> list[TokenChunk]:
        msg = Continue(rid, tokens, SamplingSpec(max_tokens=max_tokens), self.channel.name, hold_s=hold_s,
                       tool_response_tokens=len(tokens) - 2)
        await self.bus.publish(continue_stream(holder), msg)
        return await _turn(self.channel)


async def _with_stack(model_dir, body, num_blocks=128, **config):
    async with make_bus(None) as bus:
        cfg = VerifierConfig(str(model_dir), speculate=False, num_blocks=num_blocks, report_kv=False,
                             consumer="v-held", **config)
        service = VerifierService(cfg, bus)
        task = asyncio.create_task(service.run())
        try:
            return await body(Stack(service, bus, bus.open_reply_channel(TokenChunk)))
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


def tokens(chunks):
    return [t for c in chunks for t in c.token_ids]


async def test_continue_prefills_only_the_new_tokens_and_equals_a_fresh_request(model_dir, stop_token, tmp_path):
    profile_file = tmp_path / "pte.json"
    PROFILE.save(profile_file)

    async def body(stack: Stack):
        engine = stack.service.engine
        first = await stack.generate("r1", PROMPT, stop_token, hold_s=30)
        answer = tokens(first)
        assert first[-1].finish_reason == "stop" and answer[-1] == stop_token
        assert first[-1].holder == "v-held" and len(stack.service.held) == 1
        prefilled = engine.num_prefilled_tokens
        second = await stack.resume("v-held", "r1", TOOL_ANSWER)
        assert engine.num_prefilled_tokens - prefilled == len(TOOL_ANSWER)  # no second prefill of the context
        assert second[-1].holder is None and len(stack.service.held) == 0
        assert engine.runner.cache.num_free_blocks == 128
        return answer, tokens(second), first[-1].usage, second[-1].usage

    answer, continued, usage1, usage2 = await _with_stack(model_dir, body, prefix_caching=False,
                                                          pte_profile=str(profile_file))
    # Lossless: the continued turn is what a fresh request on the whole sequence generates (greedy).
    from specrelay.shared.modeling.loader import load_model

    sequence = PROMPT + answer[:-1] + TOOL_ANSWER
    fresh = ModelRunner(load_model(model_dir), num_blocks=64).generate([sequence], SamplingParams(max_tokens=10))[0]
    assert continued == fresh

    # usage adds the turns up; usage.pte prices each turn with the profile given
    assert usage2.prompt_tokens == len(PROMPT) + len(TOOL_ANSWER)
    assert usage2.completion_tokens == len(answer) + len(continued)
    assert usage2.cached_tokens == 0
    expected = trajectory_pte(PROFILE, [
        TurnTokens(prefilled_tokens=len(PROMPT), decode_tokens=len(answer)),
        TurnTokens(prefilled_tokens=len(TOOL_ANSWER), decode_tokens=len(continued),
                   cached_tokens=len(PROMPT) + len(answer) - 1, tool_response_tokens=len(TOOL_ANSWER) - 2)])
    pte = usage2.pte
    assert (pte.source, pte.turns) == ("file", 2) and usage1.pte.turns == 1
    assert pte.total == pytest.approx(expected.total) and pte.decode == pytest.approx(expected.decode)
    assert pte.prefill == len(PROMPT) + len(TOOL_ANSWER) and pte.recompute == 0
    assert pte.tool_response_tokens == len(TOOL_ANSWER) - 2
    assert pte.beta == pytest.approx(PROFILE.beta) and pte.gamma == pytest.approx(PROFILE.gamma)
    assert usage1.pte.total < pte.total


async def test_a_late_continue_gets_an_error_and_the_fresh_request_counts_as_recompute(model_dir, stop_token,
                                                                                       monkeypatch, tmp_path):
    monkeypatch.setenv("SPECRELAY_CACHE_DIR", str(tmp_path))  # no calibrated profile: the analytic fallback

    async def body(stack: Stack):
        first = await stack.generate("r2", PROMPT, stop_token, hold_s=0.05)
        await asyncio.sleep(0.6)  # the verifier loop wakes at least every 0.5 s and frees what expired
        assert len(stack.service.held) == 0
        late = await stack.resume(first[-1].holder, "r2", TOOL_ANSWER)
        assert late[-1].finish_reason == "error" and "not held here" in late[-1].error
        # The fallback: the whole conversation again, its earlier part flagged as evicted. The prefix cache got the
        # expired request's KV, so most of it loads; what it cannot supply is recomputed, not new.
        sequence = PROMPT + tokens(first)[:-1] + TOOL_ANSWER
        sampling = SamplingSpec(max_tokens=4)
        await stack.bus.publish(GENERATE_STREAM, Generate("r2b", sequence, sampling, stack.channel.name,
                                                          evicted_tokens=len(sequence) - len(TOOL_ANSWER)))
        again = await _turn(stack.channel)
        assert stack.service.engine.runner.cache.num_free_blocks == 128
        return again[-1].usage, len(sequence)

    usage, length = await _with_stack(model_dir, body)
    pte = usage.pte
    assert pte.source == "analytic" and pte.beta == 0 and pte.gamma > 0
    assert usage.cached_tokens > 0  # whole blocks of the expired request, from the prefix cache
    evicted_not_cached = length - len(TOOL_ANSWER) - usage.cached_tokens
    assert pte.recompute == evicted_not_cached and pte.prefill == len(TOOL_ANSWER)


async def test_cancel_releases_a_held_request(model_dir, stop_token):
    async def body(stack: Stack):
        first = await stack.generate("r3", PROMPT, stop_token, hold_s=60)
        assert first[-1].holder and stack.service.engine.runner.cache.num_free_blocks < 128
        await stack.bus.publish(CANCEL_STREAM, Cancel("r3"))
        for _ in range(100):
            if not len(stack.service.held):
                break
            await asyncio.sleep(0.05)
        assert len(stack.service.held) == 0
        assert stack.service.engine.runner.cache.num_free_blocks == 128

    await _with_stack(model_dir, body, prefix_caching=False)
