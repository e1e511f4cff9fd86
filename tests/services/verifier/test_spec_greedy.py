"""Greedy speculative output equals the target's own greedy output, token for token, for every proposer. The
reference and the eight (proposer, batch size) runs are independent: they run side by side in worker processes
(tests/workers.py), four in each, while the tests wait for their own."""

import pytest
import torch

from specrelay.services.verifier.engine import SpecEngine
from specrelay.shared.modeling.runner import ModelRunner
from specrelay.shared.sampling import SamplingParams

from ...workers import Workers
from .conftest import PROPOSERS, make_proposer, tiny_pair_from

NUM_PROMPTS, NEW_TOKENS = 50, 128
# the first test waits for its run while the others share the cores: room for that on a loaded machine
pytestmark = pytest.mark.timeout(1200)
HALVES = (("chain", "tree"), ("recycle", "suffix"), ("head", "hybrid"))  # about equal work


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    # repetitive prompts give the drafters something to predict, random ones test the rejection paths
    prompts = []
    for i in range(NUM_PROMPTS):
        n = int(torch.randint(3, 60, (1,), generator=gen))
        base = torch.randint(0, 101, (max(2, n // 3),), generator=gen).tolist()
        prompts.append((base * 3)[:n] if i % 2 else torch.randint(0, 101, (n,), generator=gen).tolist())
    return prompts


@pytest.fixture(scope="module")
def runs(request, tiny_pair_dir, prompts):
    """The target's reference, and (proposer, batch size) -> (Future, index) of every selected run. Each run costs
    seconds, about what starting a worker does, so a worker takes half of them: HALVES."""
    workers = Workers()
    reference, cases = workers.submit(reference_outputs, tiny_pair_dir, prompts), {}
    selected = [(item.callspec.params["proposer"], item.callspec.params["batch_size"])
                for item in request.session.items if item.module is request.module
                and item.originalname == test_speculative_greedy_equals_target_greedy.__name__]
    for half in HALVES:
        keys = [key for key in selected if key[0] in half]
        if keys:
            future = workers.submit(speculative_outputs, tiny_pair_dir, prompts, keys)
            cases.update((key, (future, i)) for i, key in enumerate(keys))
    yield reference, cases
    workers.close()


def reference_outputs(target_dir: str, prompts: list[list[int]]) -> list[list[int]]:
    """The target's own greedy output per prompt (a worker's job)."""
    target, _ = tiny_pair_from(target_dir)
    return ModelRunner(target, num_blocks=1024).generate(prompts, SamplingParams(max_tokens=NEW_TOKENS))


def speculative_outputs(target_dir: str, prompts: list[list[int]], cases: list[list]) -> list[dict]:
    """For each (proposer, batch size): per prompt the speculative engine's output, finish reason and accepted draft
    tokens, then the target cache's free blocks (a worker's job)."""
    target, draft = tiny_pair_from(target_dir)
    params = SamplingParams(max_tokens=NEW_TOKENS)
    runs = []
    for proposer, batch_size in cases:
        # a random head is right by chance only: the adaptive budget would soon stop drafting it at all
        engine = SpecEngine(ModelRunner(target, num_blocks=1024), make_proposer(proposer, draft, 101), max_nodes=12,
                            adaptive=proposer != "head")
        requests = [{"output": req.output, "finish_reason": req.finish_reason, "accepted": req.stats.accepted_tokens}
                    for start in range(0, NUM_PROMPTS, batch_size)
                    for req in engine.generate(prompts[start : start + batch_size], params)]
        runs.append({"requests": requests, "free_blocks": engine.runner.cache.num_free_blocks})
    return runs


@pytest.mark.parametrize("batch_size", [1, 8])
@pytest.mark.parametrize("proposer", PROPOSERS)
def test_speculative_greedy_equals_target_greedy(proposer, batch_size, runs):
    reference, cases = runs
    future, index = cases[proposer, batch_size]
    reference, run = reference.result(), future.result()[index]
    assert len(run["requests"]) == len(reference) == NUM_PROMPTS
    accepted = 0
    for i, (req, expected) in enumerate(zip(run["requests"], reference)):
        assert req["output"] == expected, f"prompt {i} diverged"
        assert req["finish_reason"] == "length"
        accepted += req["accepted"]
    assert accepted > 0, "the drafter never got a token accepted: the test would not exercise acceptance"
    assert run["free_blocks"] == 1024


def test_stop_tokens_end_the_request_where_the_target_would(tiny_pair, prompts, runs):
    target, draft = tiny_pair
    reference = runs[0].result()
    stop = reference[1][10]
    params = SamplingParams(max_tokens=NEW_TOKENS, stop_token_ids=(stop,))
    engine = SpecEngine(ModelRunner(target, num_blocks=256), make_proposer("chain", draft, 101))
    req = engine.generate([prompts[1]], params)[0]
    assert req.finish_reason == "stop"
    assert req.output == reference[1][: reference[1].index(stop) + 1]
