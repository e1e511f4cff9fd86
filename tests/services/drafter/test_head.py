"""The draft-head proposer: it drafts from the target's hidden states once the verifier has sent them, never
before; its weights survive a save and load bound to the target's own embeddings; hybrid trees merge suffix
decoding's and the head's paths by value, cut to the budget."""

import json
from pathlib import Path

import pytest
import torch

from specrelay.services.drafter.base import DraftInput, Verified
from specrelay.services.drafter.head import HeadProposer
from specrelay.shared.modeling.draft_head import DraftHead, HeadConfig
from specrelay.services.drafter.hybrid import merge
from specrelay.shared.draft_tree import DraftTree
from specrelay.shared.errors import ConfigError
from specrelay.shared.modeling.loader import load_model
from specrelay.shared.sampling import SamplingParams

MODELS = Path(__file__).resolve().parents[3] / "models"


@pytest.fixture(scope="module")
def target():
    return load_model(MODELS / "target")


def random_head(target, draft_vocab=64) -> DraftHead:
    torch.manual_seed(0)
    return DraftHead(HeadConfig.for_target(target, draft_vocab)).eval().bind(target)


def test_drafts_only_from_hidden_states_the_verifier_sent(target):
    proposer = HeadProposer(random_head(target))
    tokens = [5, 6, 7, 8]
    [tree] = proposer.propose([DraftInput(0, tokens, SamplingParams(), 8)])
    assert tree.num_nodes == 1  # first step after prefill: nothing to continue from
    d = target.config.hidden_size
    accepted = DraftTree([8, 9], [-1, 0], [1.0, 1.0])
    proposer.observe([Verified(0, accepted, torch.zeros(2, 8, dtype=torch.long), [1], hidden=torch.randn(2, d))])
    [tree] = proposer.propose([DraftInput(0, tokens + [9, 10], SamplingParams(), 8)])
    assert tree.num_nodes == 8 and tree.sources == [""] + ["head"] * 7
    assert set(tree.tokens[1:]) <= set(proposer.head.vocab_ids.tolist())  # drafts only the draft vocabulary
    # a step whose feedback never came: the hidden states stop short of the root, so it drafts nothing
    [tree] = proposer.propose([DraftInput(0, tokens + [9, 10, 11, 12], SamplingParams(), 8)])
    assert tree.num_nodes == 1


def test_sampled_children_carry_their_draft_distribution(target):
    proposer = HeadProposer(random_head(target))
    d = target.config.hidden_size
    params = SamplingParams(temperature=1.0, seed=3)
    gen = torch.Generator().manual_seed(3)
    proposer.propose([DraftInput(0, [5, 6], params, 6, gen)])
    proposer.observe([Verified(0, DraftTree([6], [-1], [1.0]), torch.zeros(1, 8, dtype=torch.long), [],
                               hidden=torch.randn(1, d))])
    [tree] = proposer.propose([DraftInput(0, [5, 6, 7], params, 6, gen)])
    assert tree.q is not None and tree.q.shape == (tree.num_nodes, target.config.vocab_size)
    for i in range(1, tree.num_nodes):
        assert tree.q[tree.parents[i], tree.tokens[i]] > 0  # every child was drawn from its parent's q


def test_save_and_load_bind_the_targets_embeddings(target, tmp_path):
    head = random_head(target)
    head.save(tmp_path)
    loaded = DraftHead.load(tmp_path, MODELS / "target")
    assert torch.equal(loaded.vocab_ids, head.vocab_ids)
    feature, tokens, positions = torch.randn(3, target.config.hidden_size), torch.tensor([1, 2, 3]), torch.arange(3)
    torch.testing.assert_close(loaded.logits(loaded(feature, tokens, positions)),
                               head.logits(head(feature, tokens, positions)), atol=0.05, rtol=0.05)  # fp16 weights
    config = json.loads((tmp_path / "head_config.json").read_text())
    (tmp_path / "head_config.json").write_text(json.dumps({**config, "hidden_size": 2 * config["hidden_size"]}))
    with pytest.raises(ConfigError, match="another model"):
        DraftHead.load(tmp_path, MODELS / "target")


def test_hybrid_merges_paths_by_value_and_cuts_to_the_budget():
    suffix = DraftTree([1, 2, 3, 4], [-1, 0, 1, 2], [1.0] * 4, values=[1.0, 0.9, 0.8, 0.7], sources=None)
    head = DraftTree([1, 2, 5, 6], [-1, 0, 0, 1], [1.0] * 4, values=[1.0, 0.95, 0.3, 0.6])
    tree = merge(suffix, head, max_nodes=5)
    paths = {tuple(tree.tokens[j] for j in [0, *tree.path(i)]) for i in range(1, tree.num_nodes)}
    # (1,2) proposed by both is one node at the head's 0.95; (1,5) at 0.3 misses the budget of 4 draft nodes
    assert paths == {(1, 2), (1, 2, 3), (1, 2, 3, 4), (1, 2, 6)}
    assert tree.values == [1.0, 0.95, 0.8, 0.7, 0.6]
    assert tree.sources == ["", "head", "suffix", "suffix", "head"]
    assert all(tree.parents[i] < i for i in range(1, tree.num_nodes))


def test_hidden_states_cross_the_bus_as_raw_tensors_when_the_drafter_asks(target):
    import msgspec

    from specrelay.services.drafter.service import Drafter
    from specrelay.shared.messages import DraftBatch, DraftFeedback, DraftItem, DraftReply, FeedbackItem, SamplingSpec
    from specrelay.shared.wire import WireTensor

    drafter = Drafter(HeadProposer(random_head(target)))
    reply = drafter.draft(DraftBatch(1, "r", [DraftItem("a", [5, 6], SamplingSpec(), 6)]))
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(reply), type=DraftReply).wants_hidden
    hidden = torch.randn(1, target.config.hidden_size)
    item = FeedbackItem("a", [6], [], WireTensor.from_torch(torch.zeros(1, 8, dtype=torch.long)),
                        WireTensor.from_torch(hidden.half()))
    drafter.feedback(msgspec.msgpack.decode(msgspec.msgpack.encode(DraftFeedback([item])), type=DraftFeedback))
    reply = drafter.draft(DraftBatch(2, "r", [DraftItem("a", [5, 6, 7], SamplingSpec(), 6)]))
    assert len(reply.trees[0].tokens) == 6 and reply.trees[0].sources[1:] == ["head"] * 5


def test_usage_counts_each_proposers_drafted_and_accepted_tokens(target):
    from specrelay.services.drafter.service import build_head_proposer
    from specrelay.services.verifier.engine import SpecEngine
    from specrelay.shared.modeling.runner import ModelRunner

    engine = SpecEngine(ModelRunner(target, num_blocks=256), build_head_proposer("hybrid", MODELS / "target"))
    [req] = engine.generate([[5, 6, 7, 8, 9] * 8], SamplingParams(max_tokens=48))  # the shipped pair head
    by = req.stats.by_proposer
    assert sum(a for a, _ in by.values()) == req.stats.accepted_tokens > 0
    assert sum(d for _, d in by.values()) == req.stats.drafted_tokens
    assert by["head"][1] > 0
