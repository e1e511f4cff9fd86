import pytest
import torch

from specrelay.services.drafter.draft_model import DraftModelProposer
from specrelay.services.drafter.head import HeadProposer
from specrelay.shared.modeling.draft_head import DraftHead, HeadConfig
from specrelay.services.drafter.hybrid import HybridProposer
from specrelay.services.drafter.recycling import TokenRecyclingProposer
from specrelay.services.drafter.suffix import SuffixProposer
from specrelay.shared.modeling.loader import load_model
from specrelay.shared.modeling.runner import ModelRunner

from ...conftest import save_tiny_llama

PROPOSERS = ["chain", "tree", "recycle", "suffix", "head", "hybrid"]


@pytest.fixture(scope="session")
def tiny_pair_dir(tmp_path_factory) -> str:
    """The tiny pair's target directory: `tiny_pair_from` it gives the same pair in any process."""
    return str(save_tiny_llama(tmp_path_factory.mktemp("target"), seed=1))


@pytest.fixture(scope="session")
def tiny_pair(tiny_pair_dir):
    return tiny_pair_from(tiny_pair_dir)


def tiny_pair_from(target_dir: str):
    """A random target and a smaller random draft over the same 101-token vocabulary. The draft is the target
    with noise on its weights, so it agrees often but not always (random weights would agree by chance only)."""
    target = load_model(target_dir)
    draft = load_model(target_dir)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(0.08 * torch.randn(p.shape, generator=gen))
    return target, draft


def make_proposer(name: str, draft, vocab_size: int):
    if name == "chain":
        return DraftModelProposer.chain(ModelRunner(draft, num_blocks=512), length=4)
    if name == "tree":
        return DraftModelProposer(ModelRunner(draft, num_blocks=1024), max_depth=4, branch=3, width=3)
    if name == "recycle":
        return TokenRecyclingProposer(vocab_size, k=4)
    if name == "suffix":
        return SuffixProposer(vocab_size)
    if name in ("head", "hybrid"):  # a random head: losslessness never depends on what it proposes
        with torch.random.fork_rng():
            torch.manual_seed(3)
            head = HeadProposer(DraftHead(HeadConfig.for_target(draft, vocab_size)).eval().bind(draft))
        return head if name == "head" else HybridProposer(SuffixProposer(vocab_size), head)
    raise ValueError(name)
