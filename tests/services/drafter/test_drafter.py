"""The drafter service's request bookkeeping: each request the bus names gets draft state of its own, however
requests come and go. Two requests sharing state would draft from each other's context: still lossless (the target
verifies), but acceptance, and with it the speed-up, would collapse under concurrent load."""

from __future__ import annotations

import pytest

from specrelay.services.drafter.draft_model import DraftModelProposer
from specrelay.services.drafter.service import Drafter
from specrelay.shared.messages import DraftBatch, DraftFeedback, DraftItem, SamplingSpec
from specrelay.shared.modeling.loader import load_model
from specrelay.shared.modeling.runner import ModelRunner

from ...conftest import save_tiny_llama

PROMPTS = {"a": [5, 9, 14, 3, 7, 22], "b": [40, 2, 61, 8, 33, 17, 90, 4], "c": [71, 12, 6, 55, 29, 80, 3, 48]}


@pytest.fixture(scope="module")
def draft_model(tmp_path_factory):
    return load_model(save_tiny_llama(tmp_path_factory.mktemp("draft"), seed=3))


def new_drafter(model) -> Drafter:
    return Drafter(DraftModelProposer(ModelRunner(model, num_blocks=64), max_depth=3, branch=2, width=2))


def draft(drafter: Drafter, rid: str) -> tuple[list[int], list[int]]:
    batch = DraftBatch(0, "unused", [DraftItem(rid, PROMPTS[rid], SamplingSpec(temperature=0.0), 8)])
    [tree] = drafter.draft(batch).trees
    return tree.tokens, tree.parents


def test_a_request_that_arrives_after_a_release_drafts_from_its_own_context(draft_model):
    drafter = new_drafter(draft_model)
    draft(drafter, "a")
    draft(drafter, "b")
    drafter.feedback(DraftFeedback([], released=["a"]))  # a finished while b is still running
    got_c = draft(drafter, "c")
    got_b = draft(drafter, "b")

    assert got_c == draft(new_drafter(draft_model), "c")
    assert got_b == draft(new_drafter(draft_model), "b")
    assert got_b != got_c  # the model drafts differently from the two contexts, so sharing state would show
