"""Held requests: a request that finished by a stop token keeps its KV, and `SpecEngine.extend` continues it by
prefilling only the appended tokens, with the output a fresh request on the whole sequence gives (greedy)."""

from __future__ import annotations

import pytest

from specrelay.services.verifier.engine import SpecEngine
from specrelay.shared.modeling.runner import ModelRunner
from specrelay.shared.sampling import SamplingParams

from .conftest import make_proposer

PROMPT = [5, 17, 33, 8, 91, 4, 60, 12, 7, 44, 23, 2, 71, 38, 9, 50, 66, 19]
CONTINUATION = [3, 81, 27, 14, 95, 6, 40, 58, 11]


def _greedy(engine: SpecEngine, prompt: list[int], max_tokens: int, stop: tuple[int, ...] = ()) -> list[int]:
    [req] = engine.add([prompt], [SamplingParams(max_tokens=max_tokens, stop_token_ids=stop)])
    while engine.running:
        engine.step()
    engine.release(req)
    return req.output


@pytest.mark.parametrize("proposer", [None, "chain"])
def test_extend_prefills_only_the_new_tokens_and_matches_a_fresh_request(tiny_pair, proposer):
    target, draft = tiny_pair
    runner = ModelRunner(target, num_blocks=256)
    engine = SpecEngine(runner, make_proposer(proposer, draft, 101) if proposer else None, max_nodes=6)
    free = runner.cache.num_free_blocks
    # Pick the stop token from the greedy output itself, so the first turn ends by it mid-generation.
    plain = _greedy(engine, PROMPT, 12)
    stop = (plain[6],)
    first_turn = plain[: plain.index(stop[0]) + 1]

    params = SamplingParams(max_tokens=10, stop_token_ids=stop)
    [held] = engine.add([PROMPT], [params], keep=True)  # its KV stays for extend
    while engine.running:
        engine.step()
    assert held.finish_reason == "stop" and held.output == first_turn
    before = engine.num_prefilled_tokens
    turn = engine.extend(held, CONTINUATION, SamplingParams(max_tokens=10))
    assert engine.num_prefilled_tokens - before == len(CONTINUATION)  # not the conversation again
    assert turn.stats.cached_tokens == len(PROMPT) + len(first_turn) - 1
    while engine.running:
        engine.step()
    engine.release(turn)

    # The stop token the model sampled is not part of the sequence: the continuation says how the turn ends.
    fresh = _greedy(engine, PROMPT + first_turn[:-1] + CONTINUATION, 10)
    assert turn.prompt == PROMPT + first_turn[:-1] + CONTINUATION
    assert turn.output == fresh
    assert runner.cache.num_free_blocks == free


def test_extend_refuses_a_running_request(tiny_pair):
    target, _ = tiny_pair
    engine = SpecEngine(ModelRunner(target, num_blocks=64))
    [req] = engine.add([PROMPT], [SamplingParams(max_tokens=5)])
    with pytest.raises(ValueError, match="finished"):
        engine.extend(req, CONTINUATION, SamplingParams())
