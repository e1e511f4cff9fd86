"""Greedy losslessness on the embedded pair: 50 held-out agent prompts × 128 new tokens, every proposer, batch 1
and batch 8, equal to the target's own greedy output. The reference and the eight runs are independent: they run
side by side in worker processes (tests/workers.py) while the tests wait for their own."""

from pathlib import Path

import pytest

from specrelay.models.corpus import tool_prompts
from specrelay.services.drafter.draft_model import DraftModelProposer
from specrelay.services.drafter.recycling import TokenRecyclingProposer
from specrelay.services.drafter.service import build_head_proposer
from specrelay.services.drafter.suffix import SuffixProposer
from specrelay.services.verifier.engine import SpecEngine
from specrelay.shared.modeling.loader import load_model
from specrelay.shared.modeling.runner import ModelRunner
from specrelay.shared.sampling import SamplingParams
from specrelay.shared.tokenizer import Tokenizer

from ...workers import Workers

MODELS = Path(__file__).resolve().parents[3] / "models"
NUM_PROMPTS, NEW_TOKENS = 50, 128
# the first test waits for its run while the others share the cores: room for that on a loaded machine
pytestmark = pytest.mark.timeout(1200)


@pytest.fixture(scope="module")
def runs(request):
    """The target's reference and every selected (proposer, batch size) run, side by side in worker processes."""
    workers = Workers()
    reference, cases = workers.submit(reference_outputs), {}
    for item in request.session.items:
        if item.module is request.module:
            key = (item.callspec.params["proposer"], item.callspec.params["batch_size"])
            cases[key] = workers.submit(speculative_outputs, *key)
    yield reference, cases
    workers.close()


def prompts_and_params() -> tuple[list[list[int]], SamplingParams]:
    tok = Tokenizer(MODELS / "target")
    prompts = [tok.apply_chat_template(p.messages, tools=p.tools)
               for p in tool_prompts(seed=21, num_prompts=NUM_PROMPTS)]
    return prompts, SamplingParams(max_tokens=NEW_TOKENS)  # no stop token: every request runs its 128 tokens


def reference_outputs() -> list[list[int]]:
    """The target's own greedy output per prompt (a worker's job)."""
    prompts, params = prompts_and_params()
    return ModelRunner(load_model(MODELS / "target"), num_blocks=4096).generate(prompts, params)


def speculative_outputs(proposer: str, batch_size: int) -> list[dict]:
    """Per prompt, the speculative engine's output and the draft tokens it accepted (a worker's job)."""
    target, draft = load_model(MODELS / "target"), load_model(MODELS / "draft")
    prompts, params = prompts_and_params()
    make = {"chain": lambda: DraftModelProposer.chain(ModelRunner(draft, num_blocks=4096)),
            "tree": lambda: DraftModelProposer(ModelRunner(draft, num_blocks=4096)),
            "recycle": lambda: TokenRecyclingProposer(target.config.vocab_size),
            "suffix": lambda: SuffixProposer(target.config.vocab_size),
            "hybrid": lambda: build_head_proposer("hybrid", MODELS / "target")}[proposer]  # the shipped pair head
    engine = SpecEngine(ModelRunner(target, num_blocks=4096), make(), max_nodes=16)
    return [{"output": req.output, "accepted": req.stats.accepted_tokens}
            for start in range(0, NUM_PROMPTS, batch_size)
            for req in engine.generate(prompts[start : start + batch_size], params)]


@pytest.mark.parametrize("batch_size", [1, 8])
@pytest.mark.parametrize("proposer", ["chain", "tree", "recycle", "suffix", "hybrid"])
def test_embedded_pair_greedy_is_lossless(proposer, batch_size, runs):
    reference, cases = runs
    reference, outputs = reference.result(), cases[proposer, batch_size].result()
    assert len(outputs) == len(reference) == NUM_PROMPTS
    accepted = 0
    for i, (run, expected) in enumerate(zip(outputs, reference)):
        assert run["output"] == expected, f"prompt {i} diverged"
        accepted += run["accepted"]
    assert accepted > NUM_PROMPTS  # the drafts really were accepted, so the accepted paths were exercised
