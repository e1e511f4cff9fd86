"""Suffix decoding's proposals on hand-built contexts: what a user of `--proposer suffix` gets drafted — a pattern
seen earlier in the request or in an earlier request, sized by how long the match is, never past the budget, and
under sampling a draft distribution that the drafted children really were drawn from."""

from __future__ import annotations

import pytest
import torch

from specrelay.services.drafter.base import DraftInput
from specrelay.services.drafter.suffix import SuffixProposer
from specrelay.services.drafter.suffix_tree import SuffixTree
from specrelay.shared.sampling import SamplingParams

VOCAB = 200
GREEDY = SamplingParams()


def propose(proposer: SuffixProposer, rid: int, tokens: list[int], max_nodes: int = 16,
            params: SamplingParams = GREEDY, generator: torch.Generator | None = None):
    [tree] = proposer.propose([DraftInput(rid, tokens, params, max_nodes, generator)])
    return tree


def chain(tree) -> list[int]:
    """The drafted tokens of a tree that is a single path (root excluded)."""
    assert tree.parents == [-1, *range(tree.num_nodes - 1)], f"not a chain: {tree.parents}"
    return tree.tokens[1:]


def root_children(tree) -> list[int]:
    return [t for t, p in zip(tree.tokens, tree.parents) if p == 0]


def test_a_pattern_from_earlier_in_the_request_is_proposed():
    # [1 2 3] was followed by 4 5 9 earlier; the context ends in [1 2 3] again
    tree = propose(SuffixProposer(VOCAB, max_spec_factor=1.0), 0, [7, 1, 2, 3, 4, 5, 9, 8, 1, 2, 3])
    assert tree.tokens[0] == 3
    assert chain(tree) == [4, 5, 9]  # a match of 3 tokens earns 3 (max_spec_factor 1)
    assert tree.values[1] == pytest.approx(0.5)  # [1 2 3] occurred twice, once followed by 4


def test_the_draft_is_sized_by_the_match_length():
    context = [50, 60, 10, 11, 12, 13, 14, 15, 60]  # only [60] matches: one token earned
    assert chain(propose(SuffixProposer(VOCAB, max_spec_factor=1.0), 0, context)) == [10]
    longer = SuffixProposer(VOCAB, max_spec_factor=3.0)
    assert chain(propose(longer, 0, context)) == [10, 11, 12]


def test_the_tree_never_exceeds_the_budget_and_nothing_matching_drafts_nothing():
    context = list(range(20, 40)) * 2 + list(range(20, 30))
    assert propose(SuffixProposer(VOCAB), 0, context, max_nodes=4).num_nodes == 4
    assert propose(SuffixProposer(VOCAB), 0, context, max_nodes=1).num_nodes == 1
    assert propose(SuffixProposer(VOCAB), 1, [1, 2, 3, 4]).tokens == [4]


def test_unlikely_continuations_are_cut_by_min_token_prob():
    # 5 occurred five times: followed by 6 three times, by 7 once, and by nothing yet at the end
    context = [5, 6, 1, 5, 6, 2, 5, 6, 3, 5, 7, 4, 5]
    tree = propose(SuffixProposer(VOCAB, max_spec_factor=10.0, min_token_prob=0.1), 0, context)
    assert root_children(tree) == [6, 7]  # most frequent first
    assert [tree.values[tree.tokens.index(t)] for t in (6, 7)] == pytest.approx([3 / 5, 1 / 5])
    strict = propose(SuffixProposer(VOCAB, max_spec_factor=10.0, min_token_prob=0.3), 0, context)
    assert root_children(strict) == [6]  # 1/5 < 0.3


def test_an_earlier_requests_output_is_proposed_to_a_later_one_until_evicted():
    proposer = SuffixProposer(VOCAB, max_global_tokens=12, max_spec_factor=4.0)
    answer = [100, 101, 102, 103, 104, 105]
    prompt = [1, 2, 3]
    # request 0 decodes `answer` (its first draft sees the prompt and the first output token)
    for n in range(1, len(answer) + 1):
        propose(proposer, 0, prompt + answer[:n])
    proposer.release(0)
    assert proposer.global_tree.num_tokens == len(answer)  # the output, not the prompt
    # a new request with another prompt reaches 100 101: request 0's continuation is drafted
    assert chain(propose(proposer, 1, [9, 9, 100, 101])) == [102, 103, 104, 105]
    proposer.release(1)
    # more outputs than the budget holds: the oldest request's output goes, and the bound is kept
    for rid in range(2, 5):
        for n in range(1, 6):
            propose(proposer, rid, [7] + [rid * 10 + i for i in range(n)])
            assert proposer.global_tree.num_tokens <= 12
        proposer.release(rid)
    assert 0 not in proposer.global_tree.seqs
    assert propose(proposer, 5, [9, 9, 100, 101]).num_nodes == 1


def test_indexing_as_tokens_arrive_equals_indexing_at_once():
    context = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4, 6, 2, 6, 4, 3, 3, 8, 3, 2, 7, 9]
    stepwise, at_once = SuffixProposer(VOCAB), SuffixProposer(VOCAB)
    for n in range(4, len(context) + 1, 3):  # several tokens per step, as accepted drafts come
        propose(stepwise, 0, context[:n])
    propose(stepwise, 0, context)
    propose(at_once, 0, context)
    reference = SuffixTree(stepwise.max_depth)
    reference.extend(0, context)
    for proposer in (stepwise, at_once):
        local = proposer.requests[0].local
        for pattern in ([3], [2, 3], [9, 3, 2], [3, 8], [6, 4, 3, 3]):
            assert local.find(pattern).count == reference.find(pattern).count
    assert propose(stepwise, 0, context).tokens == propose(at_once, 0, context).tokens


def test_a_request_id_that_restarts_with_another_context_drafts_from_the_new_one():
    proposer = SuffixProposer(VOCAB, max_spec_factor=1.0)
    propose(proposer, 0, [1, 2, 3, 4, 1, 2])
    assert chain(propose(proposer, 0, [8, 7, 6, 9, 8, 7])) == [6, 9]


def test_under_sampling_children_are_a_draw_from_the_q_they_carry():
    # after 5: 6 three times, 7 twice, 8 once — three children, q ∝ counts
    context = [5, 6, 1, 5, 6, 2, 5, 6, 3, 5, 7, 4, 5, 7, 9, 5, 8, 10, 5]
    params = SamplingParams(temperature=1.0)
    first_children = []
    for seed in range(300):
        tree = propose(SuffixProposer(VOCAB, max_spec_factor=10.0), 0, context, params=params,
                       generator=torch.Generator().manual_seed(seed))
        kids = root_children(tree)
        assert sorted(kids) == [6, 7, 8]  # drawn without replacement: each once
        q = tree.q[0]
        assert q.sum().item() == pytest.approx(1.0)
        assert q[[6, 7, 8]].tolist() == pytest.approx([3 / 6, 2 / 6, 1 / 6])
        assert [tree.draft_probs[i] for i, p in enumerate(tree.parents) if p == 0] == pytest.approx(
            [q[k].item() for k in kids])
        first_children.append(kids[0])
    share = {t: first_children.count(t) / 300 for t in (6, 7, 8)}
    assert share[6] == pytest.approx(0.5, abs=0.1) and share[8] == pytest.approx(1 / 6, abs=0.07)
    # greedy orders by count, no distribution attached
    greedy = propose(SuffixProposer(VOCAB, max_spec_factor=10.0), 0, context)
    assert root_children(greedy) == [6, 7, 8] and greedy.q is None


def test_the_drafter_service_drafts_with_suffix_for_requests_named_over_the_bus():
    from pathlib import Path

    from specrelay.services.drafter.service import Drafter, DrafterConfig, build_proposer
    from specrelay.shared.messages import DraftBatch, DraftFeedback, DraftItem, SamplingSpec

    models = Path(__file__).resolve().parents[3] / "models"
    proposer = build_proposer(DrafterConfig(str(models / "target"), None, "suffix"))  # no draft model needed
    assert isinstance(proposer, SuffixProposer)
    drafter = Drafter(proposer)

    def draft(rid: str, tokens: list[int]) -> list[int]:
        item = DraftItem(rid, tokens, SamplingSpec(temperature=0.0), 8)
        [tree] = drafter.draft(DraftBatch(0, "unused", [item])).trees
        return tree.tokens[1:]

    answer = [300, 301, 302, 303]
    for n in range(1, len(answer) + 1):  # "a" decodes its answer
        draft("a", [1, 2] + answer[:n])
    drafter.feedback(DraftFeedback([], released=["a"]))
    assert proposer.requests == {}  # released over the bus: its own tree is gone
    assert draft("b", [7, 8, 300, 301]) == [302, 303]  # ...and its output serves the next request
