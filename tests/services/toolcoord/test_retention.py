"""Keep / offload / drop across client-side tool pauses: the PTE policy, its recheck and eviction, InferCept."""

from __future__ import annotations

import math

import pytest

from specrelay.services.toolcoord.pauses import PauseEstimator
from specrelay.services.toolcoord.retention import (
    FixedPolicy,
    InferCeptPolicy,
    MemoryState,
    PausedConversation,
    Retention,
    RetentionConfig,
    RetentionPolicy,
)
from specrelay.shared.pte import PteProfile

GiB = 2**30
# An 8B-class model on one GPU: 25 µs per prefill token, 128 KiB of KV per token, a 40 GiB KV budget.
PROFILE = PteProfile(gamma=0.006, prefill_s_per_token=25e-6)
S = 128 * 1024
PCIE = RetentionConfig(kv_budget_bytes=40 * GiB, kv_bytes_per_token=S, offload_bytes_per_s=25e9,
                       reload_bytes_per_s=25e9, offload_stall_fraction=0.0)
SLOW_STORE = RetentionConfig(kv_budget_bytes=40 * GiB, kv_bytes_per_token=S, offload_bytes_per_s=1e9,
                             reload_bytes_per_s=1e9)


def policy(config=PCIE, **pauses) -> RetentionPolicy:
    est = PauseEstimator(prior_s=5.0)
    for name, seconds in pauses.items():
        for _ in range(10):
            est.observe([name], seconds)
    return RetentionPolicy(PROFILE, config, est)


def conv(tools=("web_search",), tokens=8000, elapsed=0.0, shared=0):
    return PausedConversation("c1", tokens, tuple(tools), elapsed, shared)


def test_short_pauses_keep_long_pauses_offload_and_a_slow_store_drops():
    half_full = MemoryState(used_bytes=20 * GiB)
    p = policy(calculator=0.05, ask_human=300.0)
    assert p.decide(conv(["calculator"]), half_full).action is Retention.KEEP
    long = p.decide(conv(["ask_human"]), half_full)
    assert long.action is Retention.OFFLOAD and long.expected_pause_s == pytest.approx(300.0)
    # Over a 1 GB/s link, copying 8000 tokens of KV out and back costs more than prefilling them again.
    assert policy(SLOW_STORE, ask_human=300.0).decide(conv(["ask_human"]), half_full).action is Retention.DROP


def test_keep_break_even_pause_follows_memory_pressure():
    # keep costs T·(C·s/B)·u/p against C for drop: break-even T* = p·B/(s·u), whatever C is.
    no_offload = RetentionConfig(kv_budget_bytes=40 * GiB, kv_bytes_per_token=S, offload_enabled=False)
    for used_fraction in (0.25, 0.9):
        c = conv(tokens=8000)
        u = used_fraction + c.context_tokens * S / (40 * GiB)
        t_star = PROFILE.prefill_s_per_token * 40 * GiB / (S * u)
        memory = MemoryState(used_bytes=int(used_fraction * 40 * GiB))
        assert policy(no_offload, web_search=t_star * 0.9).decide(c, memory).action is Retention.KEEP
        assert policy(no_offload, web_search=t_star * 1.1).decide(c, memory).action is Retention.DROP
    # On an idle server a pause of minutes is still worth keeping through.
    idle = policy(no_offload, ask_human=120.0).decide(conv(["ask_human"]), MemoryState(used_bytes=0))
    assert idle.action is Retention.KEEP


def test_never_keeps_past_the_budget_nor_offloads_into_a_full_store():
    p = policy(calculator=0.01)
    full = MemoryState(used_bytes=40 * GiB - 1000 * S, kvstore_free_bytes=0)
    decision = p.decide(conv(["calculator"], tokens=8000), full)
    assert decision.action is Retention.DROP
    assert math.isinf(decision.costs["keep"]) and math.isinf(decision.costs["offload"])


def test_a_shared_prefix_makes_dropping_cheaper():
    p = policy(SLOW_STORE, web_search=20.0)
    memory = MemoryState(used_bytes=30 * GiB)
    assert p.decide(conv(tokens=8000), memory).costs["drop"] == 8000
    assert p.decide(conv(tokens=8000, shared=6000), memory).costs["drop"] == 2000


def test_a_kept_pause_in_its_tail_is_decided_again_and_evicted():
    est = PauseEstimator()
    for seconds in [0.5] * 18 + [600.0] * 2:  # a tool that is usually quick, sometimes waits on a person
        est.observe(["browser"], seconds)
    p = RetentionPolicy(PROFILE, PCIE, est)
    memory = MemoryState(used_bytes=30 * GiB)
    first = p.decide(conv(["browser"]), memory)
    assert first.action is Retention.KEEP and first.recheck_after_s == pytest.approx(0.5)
    later = p.decide(conv(["browser"], elapsed=first.recheck_after_s + 0.1), memory)
    assert later.expected_pause_s == pytest.approx(600.0 - 0.6) and later.action is Retention.OFFLOAD


def test_learning_changes_the_decision_for_a_tool():
    p = policy()
    memory = MemoryState(used_bytes=36 * GiB)
    assert p.decide(conv(["lookup"]), memory).action is Retention.OFFLOAD  # prior: 5 s
    for _ in range(10):
        p.observe_pause(["lookup"], 0.2)
    assert p.decide(conv(["lookup"]), memory).action is Retention.KEEP


def test_evictions_free_enough_bytes_starting_with_the_longest_pauses():
    p = policy(calculator=0.05, web_search=3.0, ask_human=300.0)
    kept = [PausedConversation("calc", 8000, ("calculator",)), PausedConversation("web", 8000, ("web_search",)),
            PausedConversation("human", 8000, ("ask_human",))]
    memory = MemoryState(used_bytes=36 * GiB)
    evicted = p.choose_evictions(kept, memory, bytes_needed=8000 * S)
    assert [(d.conversation_id, d.action) for d in evicted] == [("human", Retention.OFFLOAD)]
    two = p.choose_evictions(kept, memory, bytes_needed=8001 * S)
    assert [d.conversation_id for d in two] == ["human", "web"]


def test_infercept_charges_idle_memory_where_the_pte_policy_does_not():
    # An idle server and a 60 s pause: InferCept's preserve waste (60 s × C) exceeds a fast recompute and swaps;
    # the PTE policy knows nobody wants the memory and keeps it.
    est = PauseEstimator()
    for _ in range(5):
        est.observe(["slow_api"], 60.0)
    idle = MemoryState(used_bytes=0)
    ours = RetentionPolicy(PROFILE, PCIE, est).decide(conv(["slow_api"]), idle)
    anchor = InferCeptPolicy(PROFILE, PCIE, est).decide(conv(["slow_api"]), idle)
    assert ours.action is Retention.KEEP
    assert anchor.action is Retention.OFFLOAD
    assert anchor.costs["keep"] == pytest.approx(60.0 * 8000)
    # With no batch running, InferCept's swap and discard cost only what stalls the request itself.
    assert anchor.costs["offload"] == 0.0


def replay(policy: RetentionPolicy, c: PausedConversation, memory: MemoryState, pause_s: float) -> float:
    """What the policy really pays for one pause of known length: it decides, and while it keeps it decides again
    at each recheck, paying for the time held; an eviction pays the offload or recompute cost."""
    real = policy.costs(c, memory, pause_s)
    keep_per_s = policy.costs(c, memory, 1.0)["keep"]
    elapsed, paid = 0.0, 0.0
    while True:
        decision = policy.decide(PausedConversation(c.conversation_id, c.context_tokens, c.tool_names, elapsed),
                                 memory)
        if decision.action is not Retention.KEEP:
            return paid + real[decision.action.value]
        if pause_s <= elapsed + decision.recheck_after_s:
            return paid + keep_per_s * (pause_s - elapsed)
        paid += keep_per_s * decision.recheck_after_s
        elapsed += decision.recheck_after_s


def test_on_a_mixed_workload_the_pte_policy_pays_least():
    """Replay 400 pauses of a mixed tool workload under varying memory pressure; charge each policy (in PTE) what
    its choices cost once the real pause length is known."""
    import random

    rng = random.Random(7)
    kinds = {"calculator": lambda: rng.expovariate(1 / 0.05), "web_search": lambda: rng.uniform(0.5, 4.0),
             "browser": lambda: 600.0 if rng.random() < 0.1 else rng.uniform(0.2, 1.0)}
    est = PauseEstimator()
    for name, draw in kinds.items():
        for _ in range(50):
            est.observe([name], draw())
    ours, anchor = RetentionPolicy(PROFILE, PCIE, est), InferCeptPolicy(PROFILE, PCIE, est)
    totals = {"pte": 0.0, "infercept": 0.0, "drop": 0.0, "keep": 0.0}
    for _ in range(400):
        name = rng.choice(list(kinds))
        pause = kinds[name]()
        c = conv([name], tokens=rng.randint(1000, 30000))
        memory = MemoryState(used_bytes=int(rng.uniform(0.1, 0.9) * 30 * GiB))
        real = ours.costs(c, memory, pause)
        totals["pte"] += replay(ours, c, memory, pause)
        totals["infercept"] += real[anchor.decide(c, memory).action.value]
        totals["drop"] += real["drop"]
        totals["keep"] += real["keep"]
    assert totals["pte"] < 0.6 * totals["infercept"]
    assert totals["pte"] < 0.2 * totals["drop"] and totals["pte"] < 0.2 * totals["keep"]


def test_fixed_baselines_ignore_pauses_and_memory():
    full = MemoryState(used_bytes=40 * GiB)
    assert FixedPolicy(Retention.KEEP).decide(conv(), full).action is Retention.KEEP
    assert FixedPolicy(Retention.DROP).decide(conv(["calculator"]), MemoryState(used_bytes=0)).action is Retention.DROP
