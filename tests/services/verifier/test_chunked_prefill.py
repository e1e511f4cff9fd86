"""Chunked prefill beside decode steps on the small pair: a long prompt that arrives while streams run is prefilled
a chunk per step, every running stream gets tokens in every one of those steps, and every output — the long
prompt's and the streams' — is token for token what whole-prompt prefill gives (greedy, with and without
speculation). Driven step by step (no clock)."""

from __future__ import annotations

import pytest
import torch

from specrelay.services.verifier.chunked_prefill import ChunkedPrefill
from specrelay.shared.messages import SamplingSpec

from .test_preempt_resume import PROMPTS, _engine, _generate, _serve

LONG = torch.randint(0, 101, (300,), generator=torch.Generator().manual_seed(300)).tolist()
CHUNK = 64


def _events(step, sched, engine):
    if step == 0:
        return [_generate("a", PROMPTS[0], SamplingSpec(max_tokens=40)),
                _generate("b", PROMPTS[1], SamplingSpec(max_tokens=40))]
    if step == 4:
        return [_generate("long", LONG, SamplingSpec(max_tokens=12))]
    return []


@pytest.mark.parametrize("speculate", [False, True], ids=["plain", "speculative"])
def test_a_long_prompt_is_prefilled_a_chunk_per_step_while_the_streams_decode_and_nothing_changes(tiny_pair,
                                                                                                   speculate):
    whole = _serve(_engine(tiny_pair, 128, speculate), _events)
    engine = _engine(tiny_pair, 128, speculate)
    engine.chunked = ChunkedPrefill(engine.runner, CHUNK)
    steps: list[set[str]] = []
    chunked = _serve(engine, _events, steps=steps)
    assert chunked == whole
    first = next(i for i, produced in enumerate(steps) if "long" in produced)
    assert first - 4 + 1 == -(-len(LONG) // CHUNK)  # admitted at step 4, one chunk per step
    # a and b were running (not finished) throughout and got tokens in every step of the long prompt's prefill
    assert all({"a", "b"} <= produced for produced in steps[4:first + 1])


def test_the_budget_spans_several_prompts_and_a_prompt_with_a_loaded_prefix_prefills_only_the_rest(tiny_pair):
    engine = _engine(tiny_pair, 64, speculate=False)
    chunked = ChunkedPrefill(engine.runner, 50)
    from specrelay.services.verifier.engine import Request
    from specrelay.shared.modeling.kv_cache import BlockTable
    from specrelay.shared.sampling import SamplingParams

    short, long = (Request(i, p, SamplingParams()) for i, p in enumerate((PROMPTS[1], LONG[:60])))
    chunked.start(short)
    chunked.start(long)
    assert len(long.table.blocks) == -(-60 // engine.runner.cache.block_size)  # reserved whole at the start
    [(done, _)] = chunked.step()  # 23 tokens of one, 27 of the other
    assert done is short and long.table.num_tokens == 27
    [(done, _)] = chunked.step()
    assert done is long and chunked.queue == []
    with pytest.raises(ValueError):
        full = Request(2, [1, 2], SamplingParams(), table=BlockTable())
        full.table.num_tokens = 2
        chunked.start(full)
