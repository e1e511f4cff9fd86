"""logit_bias goes into the target's and the draft's distributions alike (shared/sampling.py processed_probs): a
+100 bias forces a token and a -100 bias bans one, with and without speculation, and sampling with a bias keeps the
biased target's law."""

import pytest
import torch

from specrelay.services.verifier.engine import SpecEngine
from specrelay.shared.modeling.loader import load_model
from specrelay.shared.modeling.runner import ModelRunner
from specrelay.shared.sampling import SamplingParams

from . import law
from .conftest import make_proposer

PROMPTS = [[5, 9, 14, 5, 9, 14, 5], [40, 2, 77, 3], [8] * 6]


def outputs(tiny_pair, params: SamplingParams, speculate: bool) -> list:
    target, draft = tiny_pair
    proposer = make_proposer("tree", draft, 101) if speculate else None
    return SpecEngine(ModelRunner(target, num_blocks=256), proposer, max_nodes=8).generate(PROMPTS, params)


@pytest.mark.parametrize("speculate", [False, True])
def test_a_plus_100_bias_forces_its_token(tiny_pair, speculate):
    params = SamplingParams(max_tokens=10, logit_bias=((17, 100.0),))
    done = outputs(tiny_pair, params, speculate)
    assert [r.output for r in done] == [[17] * 10] * len(PROMPTS)
    if speculate:  # the draft was biased too: it proposed the forced token and the target accepted it
        assert all(r.stats.accepted_tokens > 0 for r in done)


def test_a_minus_100_bias_bans_a_token_with_and_without_speculation(tiny_pair):
    free = outputs(tiny_pair, SamplingParams(max_tokens=20), False)
    counts = torch.bincount(torch.tensor([t for r in free for t in r.output]), minlength=101)
    banned = int(counts.argmax())  # the token the unbiased output uses most
    params = SamplingParams(max_tokens=20, logit_bias=((banned, -100.0),))
    plain, spec = outputs(tiny_pair, params, False), outputs(tiny_pair, params, True)
    assert [r.output for r in plain] == [r.output for r in spec]
    assert all(banned not in r.output for r in plain)
    assert [r.output for r in plain] != [r.output for r in free]


NUM_SAMPLES = 4000
BIAS = ((2, 1.5), (4, -100.0), (5, -0.7))


@pytest.fixture(scope="module")
def vocab_pair(tmp_path_factory):
    target_dir, draft_dir = law.tiny_vocab_pair(tmp_path_factory)
    return load_model(target_dir), load_model(draft_dir)


def test_sampling_with_a_bias_keeps_the_biased_targets_law(vocab_pair):
    """Speculative sampling (rejection rule, unseeded) with a bias follows the biased target's exact law; the same
    samples fail against the unbiased law, so the test sees whether the bias was applied."""
    target, draft = vocab_pair
    params = SamplingParams(temperature=1.2, top_p=0.97, max_tokens=law.NUM_TOKENS, logit_bias=BIAS)
    torch.manual_seed(0)  # unseeded requests draw from the global generator
    samples = law.speculative_samples(target, draft, [params] * NUM_SAMPLES)
    assert all(4 not in s for s in samples)
    assert law.chi_square_p(samples, law.exact_law(target, params)) > 0.001
    unbiased = SamplingParams(temperature=1.2, top_p=0.97, max_tokens=law.NUM_TOKENS)
    assert law.chi_square_p(samples, law.exact_law(target, unbiased)) < 0.001
