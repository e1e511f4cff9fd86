"""Preempt -> resume on the small pair: a request paused mid-stream and let go on later produces, token for token,
what it produces unpaused — its KV kept, or dropped (an admission needed the blocks) and recomputed on resume;
greedy with and without speculation, and seeded sampling. The verifier's scheduler and engine are driven step by
step (no bus, no clock): what happens when is fixed by the step count alone."""

from __future__ import annotations

import pytest
import torch

from specrelay.services.verifier.engine import SpecEngine
from specrelay.services.verifier.scheduler import CacheBudget, Scheduler, SchedulerConfig
from specrelay.shared.messages import Generate, Preempt, SamplingSpec
from specrelay.shared.modeling.runner import ModelRunner

from .conftest import make_proposer
from .test_scheduler import Delivery

PROMPTS = [torch.randint(0, 101, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (37, 23)]


def _engine(tiny_pair, num_blocks: int, speculate: bool) -> SpecEngine:
    target, draft = tiny_pair
    proposer = make_proposer("chain", draft, target.config.vocab_size) if speculate else None
    return SpecEngine(ModelRunner(target, num_blocks=num_blocks), proposer=proposer, max_nodes=8)


def _serve(engine: SpecEngine, events, max_steps: int = 400, steps: list | None = None) -> dict[str, list[int]]:
    """Run the verifier's scheduler and engine; `events(step, scheduler, engine)` returns the messages that arrive
    before the step. Returns every request's output; `steps` gets, per step, the requests that produced tokens."""
    config = SchedulerConfig(max_batch=4, max_nodes=engine.max_nodes, max_model_len=engine.runner.max_model_len,
                             chunked_prefill=engine.chunked is not None)
    sched = Scheduler(config, CacheBudget(engine.runner.cache))
    proposer = engine.proposer
    draft = (lambda inputs, names: proposer.propose(inputs)) if proposer is not None else None
    outputs: dict[str, list[int]] = {}
    finished: set[str] = set()
    for step in range(max_steps):
        for msg in events(step, sched, engine):
            delivery = Delivery(msg)
            if isinstance(msg, Preempt):
                sched.add_preempt(delivery)
            else:
                outputs[msg.request_id] = []
                sched.add_request(delivery, first_turn=True)
        plan = sched.schedule()
        for release in plan.releases:
            engine.release(release.kv)
        replies = sched.update(plan, engine.execute(plan, draft))
        if steps is not None:
            steps.append({r.serving.msg.request_id for r in replies if r.token_ids})
        for reply in replies:
            rid = reply.serving.msg.request_id
            assert reply.offset == len(outputs[rid]) and reply.error is None
            outputs[rid] += reply.token_ids
            if reply.finish_reason is not None:
                finished.add(rid)
            if reply.release is not None:
                engine.release(reply.release.kv)
        if finished == set(outputs) and step > 30:
            assert engine.runner.cache.num_free_blocks == engine.runner.cache.allocator.num_blocks
            return outputs
    raise AssertionError("the requests did not finish")


def _generate(rid: str, prompt: list[int], sampling: SamplingSpec) -> Generate:
    return Generate(rid, prompt, sampling, f"reply-{rid}")


GREEDY = SamplingSpec(max_tokens=40)


def _two(sampling: SamplingSpec):
    return lambda step, s, e: [_generate("a", PROMPTS[0], sampling), _generate("b", PROMPTS[1], GREEDY)] \
        if step == 0 else []


@pytest.mark.parametrize("speculate", [False, True], ids=["plain", "speculative"])
@pytest.mark.parametrize("sampling", [GREEDY, SamplingSpec(temperature=0.9, top_p=0.95, seed=7, max_tokens=40)],
                         ids=["greedy", "seeded"])
def test_a_preempted_request_whose_kv_was_kept_resumes_with_identical_output(tiny_pair, speculate, sampling):
    if speculate and sampling.temperature:
        pytest.skip("speculative sampling draws against the drafts, which differ with the batch: not comparable")
    reference = _serve(_engine(tiny_pair, 64, speculate), _two(sampling))
    paused_at: list[int] = []

    def events(step, sched, engine):
        out = _two(sampling)(step, sched, engine)
        if step == 6:
            out.append(Preempt("a"))
        if step == 7:
            paused_at.append(len(engine.paused["a"].output))
        if step == 12:
            out.append(Preempt("a", resume=True))
        return out

    preempted = _serve(_engine(tiny_pair, 64, speculate), events)
    assert 0 < paused_at[0] < len(preempted["a"])  # it was paused mid-stream
    assert preempted == reference


@pytest.mark.parametrize("speculate", [False, True], ids=["plain", "speculative"])
def test_a_preempted_request_whose_kv_was_dropped_recomputes_it_and_still_matches(tiny_pair, speculate):
    reference = _serve(_engine(tiny_pair, 64, speculate), _two(GREEDY))
    seen: dict[str, int] = {}

    def events(step, sched, engine):
        out = _two(GREEDY)(step, sched, engine)
        if step == 6:
            out.append(Preempt("a"))
        if step == 8:  # a long prompt that fits only if "a"'s blocks are freed: its KV is dropped for it
            cache, bs = engine.runner.cache, engine.runner.cache.block_size
            headroom = cache.num_free_blocks - 2 * len(sched.running)
            seen["a_blocks"] = len(engine.paused["a"].table.blocks)
            n = (headroom + 1) * bs - engine.max_nodes - 1
            out.append(_generate("c", [5] * n, SamplingSpec(max_tokens=2)))
        if step == 10:
            seen["a_blocks_after"] = len(engine.paused["a"].table.blocks)
            out.append(Preempt("a", resume=True))
        return out

    preempted = _serve(_engine(tiny_pair, 40, speculate), events)
    assert seen["a_blocks"] > 0 and seen["a_blocks_after"] == 0  # dropped, then recomputed on resume
    assert preempted["a"] == reference["a"] and preempted["b"] == reference["b"]
