"""logprobs: every committed token's logprob and top alternatives come from the row of the target's processed
distribution it was drawn from, so they are the same with and without speculation, and equal to a plain forward
over the finished sequence."""

import asyncio

import pytest
import torch

from specrelay.services.verifier.engine import SpecEngine
from specrelay.shared.bus import make_bus
from specrelay.shared.messages import GENERATE_STREAM, Generate, SamplingSpec, TokenChunk
from specrelay.shared.modeling.kv_cache import BlockTable
from specrelay.shared.modeling.runner import ModelRunner, StepInput
from specrelay.shared.sampling import SamplingParams

from .conftest import make_proposer
from .test_service import collect, run_stack

NEW_TOKENS, TOL = 24, 1e-4  # logprobs agree to float32 round-off (tree attention sums in another order)


def prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(4)
    base = [torch.randint(0, 101, (n,), generator=gen).tolist() for n in (5, 9, 4, 13)]
    return [(b * 4)[: 3 * len(b)] if i % 2 else b for i, b in enumerate(base)]  # repetitive ones get accepted


def run(target, draft, params: SamplingParams, batch_size: int, speculate: bool, max_nodes: int = 8):
    proposer = make_proposer("tree", draft, 101) if speculate else None
    engine = SpecEngine(ModelRunner(target, num_blocks=512), proposer, max_nodes=max_nodes, adaptive=False)
    done = []
    for start in range(0, len(prompts()), batch_size):
        done += engine.generate(prompts()[start : start + batch_size], params)
    return done


def reference_logprobs(target, prompt: list[int], output: list[int], temperature: float) -> torch.Tensor:
    """[len(output), vocab]: log-softmax of the target's logits before each output token, from one forward."""
    runner, table = ModelRunner(target, num_blocks=64), BlockTable()
    rows = list(range(len(prompt) - 1, len(prompt) + len(output) - 1))
    logits = runner.forward([StepInput(table, prompt + output[:-1], logits_rows=rows)])[0]
    return torch.log_softmax(logits / temperature, dim=-1)


def assert_well_formed(req, k: int):
    assert len(req.logprobs) == len(req.output)
    for tok, lp in zip(req.output, req.logprobs):
        assert lp.token_id == tok and lp.logprob <= 0 and lp.logprob > float("-inf")
        values = [v for _, v in lp.top]
        assert len(lp.top) == k and values == sorted(values, reverse=True)
        assert lp.top[0][1] >= lp.logprob  # the first alternative is the most likely token


@pytest.mark.parametrize("batch_size", [1, 4])
def test_greedy_logprobs_are_the_same_with_and_without_speculation(tiny_pair, batch_size):
    target, draft = tiny_pair
    params = SamplingParams(max_tokens=NEW_TOKENS, logprobs=5)
    plain, spec = run(*tiny_pair, params, batch_size, False), run(*tiny_pair, params, batch_size, True)
    assert sum(r.stats.accepted_tokens for r in spec) > 0  # some tokens did come through speculation
    for a, b in zip(plain, spec):
        assert a.output == b.output
        assert_well_formed(a, 5), assert_well_formed(b, 5)
        for x, y in zip(a.logprobs, b.logprobs):
            assert x.top[0][0] == x.token_id  # greedy: the argmax
            assert abs(x.logprob - y.logprob) < TOL
            assert all(abs(u[1] - v[1]) < TOL for u, v in zip(x.top, y.top))
        want = reference_logprobs(target, a.prompt, a.output, 1.0)  # greedy reports temperature 1
        got = torch.tensor([lp.logprob for lp in b.logprobs])
        assert torch.allclose(got, want.gather(-1, torch.tensor(b.output)[:, None])[:, 0], atol=TOL)


@pytest.mark.parametrize("seed", [None, 3])
def test_sampled_logprobs_are_the_targets_tempered_distribution(tiny_pair, seed):
    """Under speculative sampling (seeded or not) each token's logprob is finite and the target's
    log-softmax(logits / temperature) at its position, top-k included."""
    target, _ = tiny_pair
    params = SamplingParams(temperature=0.7, top_p=0.9, seed=seed, max_tokens=NEW_TOKENS, logprobs=3)
    for req in run(*tiny_pair, params, 4, True):
        assert_well_formed(req, 3)
        want = reference_logprobs(target, req.prompt, req.output, 0.7)
        for j, lp in enumerate(req.logprobs):
            assert abs(lp.logprob - float(want[j, lp.token_id])) < TOL
            assert [i for i, _ in lp.top] == want[j].topk(3).indices.tolist()


def test_a_request_that_did_not_ask_carries_no_logprobs(tiny_pair):
    [req] = run(*tiny_pair, SamplingParams(max_tokens=4), 1, True)[:1]
    assert req.logprobs is None
    with_zero = run(*tiny_pair, SamplingParams(max_tokens=4, logprobs=0), 1, True)[0]
    assert [lp.top for lp in with_zero.logprobs] == [[]] * len(with_zero.output)


async def test_the_verifier_publishes_one_logprob_per_token(tiny_pair):
    target, draft = tiny_pair
    expected = run(*tiny_pair, SamplingParams(max_tokens=30, logprobs=2), 4, False)
    bus = make_bus(None)

    async def body(service):
        channel = bus.open_reply_channel(TokenChunk)
        for i, p in enumerate(prompts()):
            await bus.publish(GENERATE_STREAM, Generate(f"r{i}", p, SamplingSpec(max_tokens=30, logprobs=2),
                                                        channel.name))
        await bus.publish(GENERATE_STREAM, Generate("plain", prompts()[0], SamplingSpec(max_tokens=30), channel.name))
        chunks = await collect(channel, len(prompts()) + 1)
        assert all(c.logprobs is None for c in chunks["plain"])
        for i, want in enumerate(expected):
            assert all(c.logprobs is not None and len(c.logprobs) == len(c.token_ids) for c in chunks[f"r{i}"])
            got = [lp for c in chunks[f"r{i}"] for lp in c.logprobs]
            assert [lp.token_id for lp in got] == want.output
            assert all(abs(g.logprob - w.logprob) < TOL and len(g.top) == 2 for g, w in zip(got, want.logprobs))
        assert sum(c[-1].usage.accepted_tokens for c in chunks.values()) > 0  # the drafter was used

    async with bus:
        await asyncio.wait_for(run_stack(bus, target, draft, body), 120)
