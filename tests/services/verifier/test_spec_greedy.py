"""Greedy speculative output equals the target's own greedy output, token for token, for every proposer."""

import pytest
import torch

from specrelay.services.verifier.engine import SpecEngine
from specrelay.shared.modeling.runner import ModelRunner
from specrelay.shared.sampling import SamplingParams

from .conftest import PROPOSERS, make_proposer

NUM_PROMPTS, NEW_TOKENS = 50, 128


@pytest.fixture(scope="module")
def prompts_and_reference(tiny_pair):
    target, _ = tiny_pair
    gen = torch.Generator().manual_seed(0)
    # repetitive prompts give the drafters something to predict, random ones test the rejection paths
    prompts = []
    for i in range(NUM_PROMPTS):
        n = int(torch.randint(3, 60, (1,), generator=gen))
        base = torch.randint(0, 101, (max(2, n // 3),), generator=gen).tolist()
        prompts.append((base * 3)[:n] if i % 2 else torch.randint(0, 101, (n,), generator=gen).tolist())
    params = SamplingParams(max_tokens=NEW_TOKENS)
    reference = ModelRunner(target, num_blocks=1024).generate(prompts, params)
    return prompts, params, reference


@pytest.mark.parametrize("batch_size", [1, 8])
@pytest.mark.parametrize("proposer", PROPOSERS)
def test_speculative_greedy_equals_target_greedy(proposer, batch_size, tiny_pair, prompts_and_reference):
    target, draft = tiny_pair
    prompts, params, reference = prompts_and_reference
    engine = SpecEngine(ModelRunner(target, num_blocks=1024), make_proposer(proposer, draft, 101), max_nodes=12)
    accepted = 0
    for start in range(0, NUM_PROMPTS, batch_size):
        for i, req in enumerate(engine.generate(prompts[start : start + batch_size], params), start):
            assert req.output == reference[i], f"prompt {i} diverged"
            assert req.finish_reason == "length"
            accepted += req.stats.accepted_tokens
    assert accepted > 0, "the drafter never got a token accepted: the test would not exercise acceptance"
    assert engine.runner.cache.num_free_blocks == 1024


def test_stop_tokens_end_the_request_where_the_target_would(tiny_pair, prompts_and_reference):
    target, draft = tiny_pair
    prompts, _, reference = prompts_and_reference
    stop = reference[1][10]
    params = SamplingParams(max_tokens=NEW_TOKENS, stop_token_ids=(stop,))
    engine = SpecEngine(ModelRunner(target, num_blocks=256), make_proposer("chain", draft, 101))
    req = engine.generate([prompts[1]], params)[0]
    assert req.finish_reason == "stop"
    assert req.output == reference[1][: reference[1].index(stop) + 1]
