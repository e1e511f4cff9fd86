"""A seeded sampled request gives the same tokens whatever else the server runs (shared/seeded_draws.py): alone or
amid other requests, with speculation on or off, whatever the drafter and the tree budget — and its tokens still
follow the target's law."""

import pytest
import torch

from specrelay.services.verifier.engine import SpecEngine
from specrelay.shared.modeling.loader import load_model
from specrelay.shared.modeling.runner import ModelRunner
from specrelay.shared.sampling import SamplingParams

from . import law
from .conftest import make_proposer

PROMPT = [3, 17, 42, 3, 17, 42, 3, 17]
SEEDED = SamplingParams(temperature=1.0, top_p=0.95, seed=1234, max_tokens=40)


def others() -> tuple[list[list[int]], list[SamplingParams]]:
    """Requests that run beside it: greedy, unseeded, another seed, another temperature."""
    gen = torch.Generator().manual_seed(9)
    prompts = [torch.randint(0, 101, (n,), generator=gen).tolist() for n in (5, 21, 9, 14)]
    params = [SamplingParams(max_tokens=40), SamplingParams(temperature=1.0, max_tokens=40),
              SamplingParams(temperature=0.8, seed=7, max_tokens=40), SamplingParams(temperature=1.5, max_tokens=25)]
    return prompts, params


def seeded_output(tiny_pair, proposer: str | None, max_nodes: int = 16, adaptive: bool = True,
                  crowd: bool = False, positional: bool = True) -> list[int]:
    target, draft = tiny_pair
    engine = SpecEngine(ModelRunner(target, num_blocks=512), proposer and make_proposer(proposer, draft, 101),
                        max_nodes=max_nodes, adaptive=adaptive, positional_seeds=positional)
    prompts, params = others() if crowd else ([], [])
    engine.add(prompts[:2], params[:2])  # some start before it, some after
    [req] = engine.add([PROMPT], [SEEDED])
    engine.step()
    engine.add(prompts[2:], params[2:])
    while engine.running:
        engine.step()
    return req.output


def test_a_seeded_request_gives_the_same_tokens_whatever_else_runs(tiny_pair):
    alone = seeded_output(tiny_pair, None)
    assert len(alone) == 40
    runs = {
        "tree, adaptive budget": seeded_output(tiny_pair, "tree"),
        "tree, 4 nodes": seeded_output(tiny_pair, "tree", max_nodes=4, adaptive=False),
        "chain": seeded_output(tiny_pair, "chain", max_nodes=5, adaptive=False),
        "tree amid other requests": seeded_output(tiny_pair, "tree", crowd=True),
        "recycling amid other requests": seeded_output(tiny_pair, "recycle", max_nodes=8, crowd=True),
        "no speculation amid other requests": seeded_output(tiny_pair, None, crowd=True),
    }
    assert {name: out for name, out in runs.items() if out != alone} == {}


def test_without_positional_seeds_the_tree_changes_the_output(tiny_pair):
    """CONTROL: the seed as a plain random stream (the engine's default, kept for the rejection-rule tests) does
    depend on the drafting, which is what positional seeds remove."""
    alone = seeded_output(tiny_pair, None, positional=False)
    assert seeded_output(tiny_pair, "tree", positional=False) != alone


NUM_SEEDS = 4000


@pytest.fixture(scope="module")
def vocab_pair(tmp_path_factory):
    target_dir, draft_dir = law.tiny_vocab_pair(tmp_path_factory)
    return load_model(target_dir), load_model(draft_dir)


def test_seeded_tokens_follow_the_targets_law(vocab_pair):
    """Over many seeds the positional draws under speculation are the target's law (chi-square)."""
    target, draft = vocab_pair
    params = [SamplingParams(temperature=1.3, top_p=0.95, seed=s, max_tokens=law.NUM_TOKENS) for s in range(NUM_SEEDS)]
    samples = law.speculative_samples(target, draft, params, positional_seeds=True)
    assert law.chi_square_p(samples, law.exact_law(target, params[0])) > 0.001
    again = law.speculative_samples(target, draft, params[:200], positional_seeds=True)
    assert again == samples[:200]  # the same seeds, a batch 20 times smaller: the same tokens
