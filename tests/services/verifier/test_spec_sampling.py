"""Sampling losslessness: the joint law of the first 3 tokens under speculation is the target's own.

The target's law is computed exactly (enumerating every 3-token continuation of a tiny-vocabulary model), the
speculative engine is sampled over 20,000 seeds, and a chi-square test compares the two. The negative control runs
the same test with a deliberately broken acceptance rule — on rejection it draws from p instead of the residual
norm(max(p − q, 0)) — and asserts that the test catches it. The five 20,000-seed runs are independent: they run
side by side in worker processes (tests/workers.py) while the tests wait for their own.
"""

import itertools

import pytest
import torch
from scipy.stats import chi2

from specrelay.kernels import spec_accept as accept_module
from specrelay.services.drafter.base import DraftInput
from specrelay.services.drafter.draft_model import DraftModelProposer
from specrelay.services.drafter.head import HeadProposer
from specrelay.shared.modeling.draft_head import DraftHead, HeadConfig
from specrelay.services.drafter.hybrid import HybridProposer
from specrelay.services.drafter.recycling import TokenRecyclingProposer
from specrelay.services.drafter.suffix import SuffixProposer
from specrelay.services.verifier import engine as engine_module
from specrelay.services.verifier.engine import SpecEngine
from specrelay.shared.modeling.kv_cache import BlockTable
from specrelay.shared.modeling.loader import load_model
from specrelay.shared.modeling.runner import ModelRunner, StepInput
from specrelay.shared.sampling import SamplingParams, processed_probs

from ...conftest import save_tiny_llama
from ...workers import Workers

VOCAB, NUM_SEEDS, PROMPT = 6, 20_000, [1, 4, 2]
PARAMS = dict(temperature=1.3, top_p=0.95, max_tokens=3)
# the first test waits for its run while the others share the cores: room for that on a loaded machine
pytestmark = pytest.mark.timeout(1200)


@pytest.fixture(scope="module")
def tiny_vocab_pair(tmp_path_factory) -> tuple[str, str]:
    """The pair's directories (each worker loads them)."""
    target = save_tiny_llama(tmp_path_factory.mktemp("t"), seed=3, vocab_size=VOCAB, initializer_range=0.3)
    draft = save_tiny_llama(tmp_path_factory.mktemp("d"), seed=4, vocab_size=VOCAB, initializer_range=0.3)
    return str(target), str(draft)


@pytest.fixture(scope="module")
def target_law(tiny_vocab_pair):
    return exact_law(load_model(tiny_vocab_pair[0]))


@pytest.fixture(scope="module")
def runs(request, tiny_vocab_pair):
    """(proposer, broken rule) -> Future of its samples, for every test of this module that was selected."""
    workers, runs = Workers(), {}
    for item in request.session.items:
        if item.module is request.module:
            broken = item.originalname == test_negative_control_a_broken_rule_is_caught.__name__
            key = (item.callspec.params["proposer"], broken)
            runs[key] = runs.get(key) or workers.submit(samples_in_worker, *tiny_vocab_pair, *key)
    yield runs
    workers.close()


def exact_law(target) -> dict[tuple[int, ...], float]:
    """P(t1, t2, t3) under target-only sampling, by enumeration."""
    runner = ModelRunner(target, num_blocks=64)
    params = SamplingParams(**PARAMS)
    law = {}
    for prefix in itertools.product(range(VOCAB), repeat=2):
        table = BlockTable()
        logits = runner.forward([StepInput(table, PROMPT + list(prefix), logits_rows=[2, 3, 4])])[0]
        runner.release(table)
        p = processed_probs(logits, params)  # rows: after the prompt, after t1, after t2
        for t3 in range(VOCAB):
            law[(*prefix, t3)] = float(p[0, prefix[0]] * p[1, prefix[1]] * p[2, t3])
    return law


def chi_square_p(samples: list[tuple[int, ...]], law: dict) -> float:
    """Cells with expected count < 5 are pooled into one; a sample the target can never produce gives p = 0."""
    counts = {k: 0 for k in law}
    for s in samples:
        counts[s] += 1
    if any(counts[k] for k in law if law[k] == 0):
        return 0.0
    n = len(samples)
    big = [k for k in law if law[k] * n >= 5]
    small = [k for k in law if 0 < law[k] * n < 5]
    observed = [counts[k] for k in big] + ([sum(counts[k] for k in small)] if small else [])
    expected = [law[k] * n for k in big] + ([sum(law[k] for k in small) * n] if small else [])
    stat = sum((o - e) ** 2 / e for o, e in zip(observed, expected))
    return float(chi2.sf(stat, len(observed) - 1))


def speculative_samples(target, proposer) -> list[tuple[int, ...]]:
    engine = SpecEngine(ModelRunner(target, num_blocks=4 * NUM_SEEDS // 16 * 4), proposer, max_nodes=6,
                        adaptive=False)
    samples = []
    for start in range(0, NUM_SEEDS, 5000):
        requests = engine.add([PROMPT] * 5000, [SamplingParams(**PARAMS, seed=s) for s in range(start, start + 5000)])
        while engine.running:
            engine.step()
        samples += [tuple(r.output) for r in requests]
    return samples


def samples_in_worker(target_dir: str, draft_dir: str, proposer: str, broken: bool) -> list[list[int]]:
    """One run, in a worker process of its own (so the broken rule patched in stays there)."""
    target, draft = load_model(target_dir), load_model(draft_dir)
    if broken:
        engine_module.spec_accept = broken_accept
    return [list(s) for s in speculative_samples(target, make(proposer, draft))]


def broken_accept(tokens, parents, cu_nodes, target_probs, draft_probs, uniforms, final_uniforms, greedy):
    """NEGATIVE CONTROL: after a rejection, draw the next token from p (ignoring the residual)."""
    result = accept_module.spec_accept_reference(tokens, parents, cu_nodes, target_probs, draft_probs, uniforms,
                                                 final_uniforms, greedy)
    for s in range(len(cu_nodes) - 1):
        path = result.accepted_nodes[s, : int(result.num_accepted[s])].tolist()
        last = path[-1] if path else 0
        has_children = bool((parents[cu_nodes[s] : cu_nodes[s + 1]] == last).any())
        if has_children:  # the walk stopped on a rejection
            p = target_probs[int(cu_nodes[s]) + last]
            result.next_token[s] = accept_module.inverse_cdf(p, final_uniforms[s])
    return result


def suffix_after_earlier_requests() -> SuffixProposer:
    """Suffix decoding in a server that served requests before: its global tree holds 2,000 earlier output tokens,
    so every context has several continuations and the trees are wide (3-token outputs alone make tiny ones)."""
    proposer = SuffixProposer(VOCAB, max_global_tokens=100_000)  # the history stays for the whole test
    earlier = torch.randint(0, VOCAB, (2000,), generator=torch.Generator().manual_seed(5)).tolist()
    for n in (1, len(earlier)):  # drafted first after one output token, then after all of them
        proposer.propose([DraftInput(-1, PROMPT + earlier[:n], SamplingParams(), 1)])
    proposer.release(-1)
    return proposer


def make(name, draft):
    if name == "tree":
        return DraftModelProposer(ModelRunner(draft, num_blocks=6000), max_depth=3, branch=3, width=2)
    if name == "chain":
        return DraftModelProposer.chain(ModelRunner(draft, num_blocks=6000), length=3)
    if name == "suffix":
        return suffix_after_earlier_requests()
    if name in ("head", "hybrid"):  # a random head: any q keeps the law; the hybrid's suffix has a history
        with torch.random.fork_rng():
            torch.manual_seed(6)
            head = HeadProposer(DraftHead(HeadConfig.for_target(draft, VOCAB)).eval().bind(draft), branch=3)
        return head if name == "head" else HybridProposer(suffix_after_earlier_requests(), head)
    return TokenRecyclingProposer(VOCAB, k=3)


# the chain is a tree of width 1: same code path
@pytest.mark.parametrize("proposer", ["tree", "recycle", "suffix", "head", "hybrid"])
def test_speculative_sampling_matches_the_target_law(proposer, runs, target_law):
    samples = [tuple(s) for s in runs[proposer, False].result()]
    assert chi_square_p(samples, target_law) > 0.001


@pytest.mark.parametrize("proposer", ["recycle", "suffix"])
def test_negative_control_a_broken_rule_is_caught(proposer, runs, target_law):
    """NEGATIVE CONTROL (expected to detect bias): the same test must fail for a wrong acceptance rule."""
    samples = [tuple(s) for s in runs[proposer, True].result()]
    assert chi_square_p(samples, target_law) < 0.001
