"""The sampling-law machinery of test_spec_sampling at a small size: a tiny-vocabulary pair, the target's exact law
over two tokens by enumeration, and many speculative samples of them, for a chi-square test."""

import itertools

import torch

from specrelay.services.drafter.draft_model import DraftModelProposer
from specrelay.services.verifier.engine import SpecEngine
from specrelay.shared.modeling.kv_cache import BlockTable
from specrelay.shared.modeling.runner import ModelRunner, StepInput
from specrelay.shared.sampling import SamplingParams, processed_probs

from ...conftest import save_tiny_llama
from .test_spec_sampling import chi_square_p  # noqa: F401 - the same test, re-exported for this module's users

VOCAB, PROMPT, NUM_TOKENS = 6, [1, 4, 2], 2


def tiny_vocab_pair(tmp_path_factory) -> tuple[str, str]:
    target = save_tiny_llama(tmp_path_factory.mktemp("t"), seed=3, vocab_size=VOCAB, initializer_range=0.3)
    draft = save_tiny_llama(tmp_path_factory.mktemp("d"), seed=4, vocab_size=VOCAB, initializer_range=0.3)
    return str(target), str(draft)


def exact_law(target, params: SamplingParams) -> dict[tuple[int, int], float]:
    """P(t1, t2) under target-only sampling with `params`, by enumeration."""
    runner, law = ModelRunner(target, num_blocks=64), {}
    for t1 in range(VOCAB):
        table = BlockTable()
        logits = runner.forward([StepInput(table, PROMPT + [t1], logits_rows=[2, 3])])[0]
        runner.release(table)
        p = processed_probs(logits, params)  # rows: after the prompt, after t1
        for t2 in range(VOCAB):
            law[(t1, t2)] = float(p[0, t1] * p[1, t2])
    return law


def speculative_samples(target, draft, params: list[SamplingParams], positional_seeds: bool = False):
    """One two-token sample per params, all in one batch, under tree speculation."""
    proposer = DraftModelProposer(ModelRunner(draft, num_blocks=4 * len(params)), max_depth=2, branch=3, width=2)
    engine = SpecEngine(ModelRunner(target, num_blocks=4 * len(params)), proposer, max_nodes=6, adaptive=False,
                        positional_seeds=positional_seeds)
    requests = engine.add([PROMPT] * len(params), params)
    while engine.running:
        engine.step()
    assert sum(r.stats.accepted_tokens for r in requests) > 0  # speculation did produce tokens
    return [tuple(r.output) for r in requests]


def all_pairs() -> list[tuple[int, int]]:
    return list(itertools.product(range(VOCAB), repeat=NUM_TOKENS))
