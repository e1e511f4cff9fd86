"""Greedy losslessness on the embedded pair: 50 held-out agent prompts × 128 new tokens, every proposer, batch 1
and batch 8, equal to the target's own greedy output."""

from pathlib import Path

import pytest

from specrelay.models.corpus import tool_prompts
from specrelay.services.drafter.draft_model import DraftModelProposer
from specrelay.services.drafter.recycling import TokenRecyclingProposer
from specrelay.services.drafter.suffix import SuffixProposer
from specrelay.services.verifier.engine import SpecEngine
from specrelay.shared.modeling.loader import load_model
from specrelay.shared.modeling.runner import ModelRunner
from specrelay.shared.sampling import SamplingParams
from specrelay.shared.tokenizer import Tokenizer

MODELS = Path(__file__).resolve().parents[3] / "models"
NUM_PROMPTS, NEW_TOKENS = 50, 128


@pytest.fixture(scope="module")
def embedded():
    target, draft = load_model(MODELS / "target"), load_model(MODELS / "draft")
    tok = Tokenizer(MODELS / "target")
    prompts = [tok.apply_chat_template(p.messages, tools=p.tools) for p in tool_prompts(seed=21, num_prompts=NUM_PROMPTS)]
    params = SamplingParams(max_tokens=NEW_TOKENS)  # no stop token: every request runs its 128 tokens
    reference = ModelRunner(target, num_blocks=4096).generate(prompts, params)
    return target, draft, prompts, params, reference


@pytest.mark.parametrize("batch_size", [1, 8])
@pytest.mark.parametrize("proposer", ["chain", "tree", "recycle", "suffix"])
def test_embedded_pair_greedy_is_lossless(proposer, batch_size, embedded):
    target, draft, prompts, params, reference = embedded
    make = {"chain": lambda: DraftModelProposer.chain(ModelRunner(draft, num_blocks=4096)),
            "tree": lambda: DraftModelProposer(ModelRunner(draft, num_blocks=4096)),
            "recycle": lambda: TokenRecyclingProposer(target.config.vocab_size),
            "suffix": lambda: SuffixProposer(target.config.vocab_size)}[proposer]
    engine = SpecEngine(ModelRunner(target, num_blocks=4096), make(), max_nodes=16)
    accepted = 0
    for start in range(0, NUM_PROMPTS, batch_size):
        for i, req in enumerate(engine.generate(prompts[start : start + batch_size], params), start):
            assert req.output == reference[i], f"prompt {i} diverged"
            accepted += req.stats.accepted_tokens
    assert accepted > NUM_PROMPTS  # the drafts really were accepted, so the accepted paths were exercised
