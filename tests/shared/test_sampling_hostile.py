"""The sampler's distribution stays finite whatever a request or a model sends it: a tiny temperature is greedy,
NaN and infinite logits have a defined meaning, and nothing reaches `torch.multinomial` as NaN (issue 18, defect 2:
`"temperature": 1e-40` used to raise inside the verifier and take `specrelay serve` down)."""

import pytest
import torch

from specrelay.services.drafter.draft_model import DraftModelProposer
from specrelay.services.verifier.engine import SpecEngine
from specrelay.shared.errors import SpecrelayError
from specrelay.shared.modeling.loader import load_model
from specrelay.shared.modeling.runner import ModelRunner
from specrelay.shared.sampling import SamplingParams, processed_probs, sample

from ..conftest import save_tiny_llama

NAN, INF = float("nan"), float("inf")
SETTINGS = [dict(temperature=0.7), dict(temperature=1.0, top_k=2), dict(temperature=1.5, top_p=0.5),
            dict(temperature=2.0, top_k=3, top_p=0.9), dict(temperature=1e-4, top_p=1e-30),
            dict(temperature=0.9, top_p=5e-324)]  # a top_p that is 0 in float32: only the best token is left


def assert_distribution(probs: torch.Tensor) -> None:
    assert bool(torch.isfinite(probs).all()) and bool((probs >= 0).all())
    assert torch.allclose(probs.sum(-1), torch.ones(probs.shape[0]))


@pytest.mark.parametrize("temperature", [1e-45, 1e-40, 1e-38, 1e-30, 1e-8, 9.9e-6])
def test_a_tiny_temperature_is_greedy(temperature):
    logits = torch.randn(8, 50, generator=torch.Generator().manual_seed(0)) * 10
    params = SamplingParams(temperature=temperature, top_k=5, top_p=0.9, seed=1)
    assert params.greedy
    probs = processed_probs(logits, params)
    assert torch.equal(probs, processed_probs(logits, SamplingParams()))
    assert sample(probs, torch.Generator().manual_seed(1)).tolist() == logits.argmax(-1).tolist()


@pytest.mark.parametrize("settings", SETTINGS)
def test_nan_and_infinite_logits_give_a_distribution(settings):
    logits = torch.tensor([
        [NAN, 1.0, 2.0, -1.0],  # a NaN token gets no mass
        [INF, 0.0, INF, -INF],  # the +inf tokens share all of it
        [-INF, -INF, 3.0, -INF],  # one finite token: all of it
        [-INF, -INF, -INF, -INF],  # nothing to go on: the argmax (token 0), as greedy would pick
        [NAN, NAN, NAN, NAN],
        [3e38, -3e38, 1e38, 0.0],  # finite, but dividing by a temperature < 1 overflows unless shifted first
    ])
    probs = processed_probs(logits, SamplingParams(**settings))
    assert_distribution(probs)
    assert probs[0, 0] == 0 and probs[1, 1] == probs[1, 3] == 0
    assert probs[2].tolist() == [0.0, 0.0, 1.0, 0.0]
    assert probs[3].tolist() == probs[4].tolist() == [1.0, 0.0, 0.0, 0.0]
    assert probs[5, 0] == 1.0
    if "top_k" not in settings and settings.get("top_p", 1.0) == 1.0:
        assert probs[1, 0] == probs[1, 2] == 0.5
    assert sample(probs, torch.Generator().manual_seed(0)).shape == (6,)


def test_greedy_ignores_nan_logits():
    probs = processed_probs(torch.tensor([[NAN, 1.0, 2.0]]), SamplingParams())
    assert probs.tolist() == [[0.0, 0.0, 1.0]]


@pytest.mark.parametrize("temperature", [NAN, INF, -INF])
def test_a_temperature_that_is_not_a_number_is_a_clear_error(temperature):
    with pytest.raises(SpecrelayError, match="temperature must be"):
        SamplingParams(temperature=temperature)


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    target = load_model(save_tiny_llama(tmp_path_factory.mktemp("target"), seed=1))
    draft = load_model(save_tiny_llama(tmp_path_factory.mktemp("draft"), seed=2))
    return target, draft


@pytest.mark.parametrize("proposer", ["chain", "tree"])
def test_speculation_at_a_tiny_temperature_is_the_targets_greedy_output(tiny_pair, proposer):
    """The verifier's sampling and the drafter's both take a tiny temperature as greedy, so the output is lossless
    greedy output; a greedy request in the same batch is unaffected."""
    target, draft = tiny_pair
    prompts = [[5, 17, 3, 99, 42], [1, 2, 3, 1, 2, 3, 1, 2]]
    reference = ModelRunner(target, num_blocks=256).generate(prompts, SamplingParams(max_tokens=24))
    drafter = ModelRunner(draft, num_blocks=256)
    proposer = (DraftModelProposer.chain(drafter, length=4) if proposer == "chain" else
                DraftModelProposer(drafter, max_depth=3, branch=2, width=2))
    engine = SpecEngine(ModelRunner(target, num_blocks=256), proposer, max_nodes=8)
    requests = engine.add(prompts, [SamplingParams(temperature=1e-40, seed=3, max_tokens=24),
                                    SamplingParams(max_tokens=24)])
    while engine.running:
        engine.step()
    assert [r.output for r in requests] == reference
    assert engine.runner.cache.num_free_blocks == 256


def test_verification_draws_a_token_of_the_vocabulary_whatever_q_a_drafter_sends():
    """q crosses the bus from the drafter's process: NaN, infinite or negative masses must not make the verifier
    raise or emit a token outside the vocabulary (p, from `processed_probs`, is always a distribution)."""
    from specrelay.kernels.spec_accept import spec_accept_reference

    vocab = 7
    tokens, parents, cu = torch.tensor([0, 1, 2, 3]), torch.tensor([-1, 0, 0, 1]), torch.tensor([0, 4])
    p = processed_probs(torch.randn(4, vocab, generator=torch.Generator().manual_seed(0)),
                        SamplingParams(temperature=0.8))
    for q in (torch.full((4, vocab), NAN), torch.full((4, vocab), INF), -torch.ones(4, vocab),
              torch.tensor([[NAN, INF, -1.0, 0.5, 0.5, 0.0, 0.0]] * 4), torch.zeros(4, vocab)):
        for u in (0.0, 0.3, 1.0):
            result = spec_accept_reference(tokens, parents, cu, p, q, torch.full((4,), u), torch.tensor([u]), False)
            assert 0 <= int(result.next_token[0]) < vocab and 0 <= int(result.num_accepted[0]) <= 2
