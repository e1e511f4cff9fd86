import pytest
import torch

from specrelay.shared.errors import SpecrelayError
from specrelay.shared.sampling import SamplingParams, processed_probs, sample


def test_greedy_is_one_hot_on_the_argmax():
    probs = processed_probs(torch.tensor([[0.1, 2.0, -1.0]]), SamplingParams())
    assert probs.tolist() == [[0.0, 1.0, 0.0]]


def test_top_k_keeps_the_k_largest():
    probs = processed_probs(torch.tensor([[1.0, 4.0, 3.0, 2.0]]), SamplingParams(temperature=1.0, top_k=2))
    assert probs[0, 0] == 0 and probs[0, 3] == 0
    expected = torch.softmax(torch.tensor([4.0, 3.0]), 0)
    assert torch.allclose(probs[0, [1, 2]], expected)


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    probs = processed_probs(logits, SamplingParams(temperature=1.0, top_p=0.75))
    assert torch.allclose(probs, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))


def test_temperature_sharpens():
    logits = torch.tensor([[1.0, 2.0]])
    cold = processed_probs(logits, SamplingParams(temperature=0.5))
    hot = processed_probs(logits, SamplingParams(temperature=2.0))
    assert cold[0, 1] > hot[0, 1] > 0.5


def test_sample_follows_the_distribution():
    probs = torch.tensor([[0.2, 0.8]]).expand(20000, 2)
    draws = sample(probs, torch.Generator().manual_seed(0))
    assert abs(draws.float().mean().item() - 0.8) < 0.02


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-2),
                                 dict(max_tokens=-1)])
def test_bad_parameters_are_clear_errors(bad):
    with pytest.raises(SpecrelayError, match="must be"):
        SamplingParams(**bad)
