"""Identical prompts admitted together are prefilled once, each other request getting a copy of the KV
(services/verifier/engine_fork.py): every output is the one its request gives alone, the prompt is prefilled once,
and every block comes back."""

import pytest
import torch

from specrelay.services.verifier.engine import SpecEngine
from specrelay.services.verifier.handoffs import Admit, StepPlan
from specrelay.shared.modeling.kv_cache import BlockTable
from specrelay.shared.modeling.runner import ModelRunner
from specrelay.shared.sampling import SamplingParams
from specrelay.shared.sampling_wire import spec_from_params

from .conftest import make_proposer

PROMPT = torch.randint(0, 101, (37,), generator=torch.Generator().manual_seed(5)).tolist()  # 2 blocks and a part
OTHER = [7, 8, 9, 10, 11]


def engine(tiny_pair, proposer: str | None = "chain", positional: bool = False) -> SpecEngine:
    target, draft = tiny_pair
    return SpecEngine(ModelRunner(target, num_blocks=256), proposer and make_proposer(proposer, draft, 101),
                      max_nodes=5, adaptive=False, positional_seeds=positional)


def run(eng: SpecEngine, prompts: list[list[int]], params: list[SamplingParams]):
    requests = eng.add(prompts, params)
    while eng.running:
        eng.step()
    return requests


def same(got: tuple, want: tuple) -> bool:
    """Same tokens; the same logprobs up to float rounding (a batch of 4 and a batch of 1 round differently)."""
    (tokens, logprobs), (want_tokens, want_logprobs) = got, want
    values = lambda lps: torch.tensor([[lp.logprob, *(v for _, v in lp.top)] for lp in lps])  # noqa: E731
    return (tokens == want_tokens and [[lp.token_id, *(t for t, _ in lp.top)] for lp in logprobs]
            == [[lp.token_id, *(t for t, _ in lp.top)] for lp in want_logprobs]
            and torch.allclose(values(logprobs), values(want_logprobs), atol=1e-4))


def solo(tiny_pair, params: SamplingParams, proposer: str | None = "chain", positional: bool = False):
    [req] = run(engine(tiny_pair, proposer, positional), [PROMPT], [params])
    return req.output, req.logprobs


@pytest.mark.parametrize("proposer", [None, "chain"])
def test_greedy_duplicates_prefill_once_and_equal_their_solo_runs(tiny_pair, proposer):
    params = SamplingParams(max_tokens=24, logprobs=2)
    eng = engine(tiny_pair, proposer)
    total = eng.runner.cache.num_free_blocks
    requests = run(eng, [PROMPT, OTHER, PROMPT, PROMPT], [params] * 4)
    alone = solo(tiny_pair, params, proposer)
    for r in (requests[0], requests[2], requests[3]):
        assert same((r.output, r.logprobs), alone)
    assert eng.num_prefilled_tokens == len(PROMPT) + len(OTHER)
    assert [r.stats.cached_tokens for r in requests] == [0, 0, 0, 0]
    assert eng.runner.cache.num_free_blocks == total


@pytest.mark.parametrize("positional", [False, True])
def test_seeded_sampled_duplicates_equal_their_solo_runs(tiny_pair, positional):
    params = [SamplingParams(temperature=1.0, top_p=0.9, seed=100 + i, max_tokens=24, logprobs=1,
                             logit_bias=((5, 3.0),)) for i in range(3)]
    eng = engine(tiny_pair, positional=positional)
    total = eng.runner.cache.num_free_blocks
    requests = run(eng, [PROMPT] * 3, params)
    outputs = [(r.output, r.logprobs) for r in requests]
    for got, p in zip(outputs, params):
        assert same(got, solo(tiny_pair, p, positional=positional))
    assert len({tuple(o) for o, _ in outputs}) > 1  # their own seeds: not one draw shared
    assert eng.num_prefilled_tokens == len(PROMPT)
    assert eng.runner.cache.num_free_blocks == total


def test_a_shared_cached_prefix_forks_the_rest_and_a_longer_one_does_not(tiny_pair):
    eng = engine(tiny_pair, None)
    total = eng.runner.cache.num_free_blocks
    [held] = eng.add([PROMPT[:20]], [SamplingParams(max_tokens=1)], keep=True)  # 16 tokens' KV to load from
    tables = []
    for cached in (16, 16, 32):
        table = BlockTable()
        for _ in range(2):
            eng.runner.cache.reserve(table, 16)
            table.num_tokens += 16
        eng.runner.cache.truncate(table, cached)
        if cached == 16:
            eng.runner.cache.move_slots(list(range(held.table.blocks[0] * 16, held.table.blocks[0] * 16 + 16)),
                                        list(range(table.blocks[0] * 16, table.blocks[0] * 16 + 16)))
        tables.append(table)
    before = eng.num_prefilled_tokens
    params = SamplingParams(max_tokens=8)
    requests = eng.add([PROMPT] * 3, [params] * 3, tables)
    assert eng.num_prefilled_tokens - before == (len(PROMPT) - 16) + (len(PROMPT) - 32)
    while eng.running:
        eng.step()
    assert requests[0].output == requests[1].output == solo(tiny_pair, params, None)[0]
    eng.release(held)
    assert eng.runner.cache.num_free_blocks == total


def test_admissions_of_one_step_are_prefilled_once_and_booked_as_cached(tiny_pair):
    eng = engine(tiny_pair)
    total = eng.runner.cache.num_free_blocks
    params = [SamplingParams(max_tokens=12), SamplingParams(temperature=1.0, seed=3, max_tokens=12)]
    admits = [Admit(f"r{i}", PROMPT, spec_from_params(params[i % 2])) for i in range(3)]
    result = eng.execute(StepPlan(admits=admits))
    assert not any(out.error for out in result.outputs)
    assert eng.num_prefilled_tokens == len(PROMPT)
    assert [a.cached_tokens for a in admits] == [0, len(PROMPT), len(PROMPT)]
    kept = {r.name: r for r in eng.running}
    while eng.running:
        eng.step()
    assert kept["r0"].output == kept["r2"].output == solo(tiny_pair, params[0])[0]
    assert kept["r1"].output == solo(tiny_pair, params[1])[0]
    for r in kept.values():
        eng.release(r)
    assert eng.runner.cache.num_free_blocks == total


def test_a_duplicate_a_step_later_copies_a_running_ones_prompt_but_its_last_token(tiny_pair):
    eng = engine(tiny_pair)
    total = eng.runner.cache.num_free_blocks
    params = SamplingParams(max_tokens=16)
    [first] = eng.add([PROMPT], [params])
    eng.step()
    [later] = eng.add([PROMPT], [params])
    assert eng.num_prefilled_tokens == len(PROMPT) + 1
    while eng.running:
        eng.step()
    assert first.output == later.output == solo(tiny_pair, params)[0]
    assert eng.runner.cache.num_free_blocks == total
    [kept] = eng.add([PROMPT], [SamplingParams(max_tokens=1)], keep=True)  # finished: its table may be handed on
    before = eng.num_prefilled_tokens
    eng.add([PROMPT], [params])
    assert eng.num_prefilled_tokens - before == len(PROMPT)
    while eng.running:
        eng.step()
    eng.release(kept)
    assert eng.runner.cache.num_free_blocks == total
