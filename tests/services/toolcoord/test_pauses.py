"""Pause estimates per tool: mean, tail quantile, and what remains of a pause that has already lasted a while."""

from __future__ import annotations

import pytest

from specrelay.services.toolcoord.pauses import PauseEstimator, PauseStats


def test_ewma_starts_at_the_first_observation_and_follows_changes():
    stats = PauseStats(ewma_s=5.0, alpha=0.5)
    stats.observe(1.0)
    assert stats.expected_s() == 1.0  # the prior is replaced, not averaged in
    stats.observe(3.0)
    assert stats.expected_s() == pytest.approx(2.0)


def test_quantile_and_remaining_pause():
    stats = PauseStats(ewma_s=1.0)
    for x in [1, 1, 1, 1, 1, 1, 1, 1, 1, 30]:
        stats.observe(x)
    assert stats.quantile_s(0.9) == 1 and stats.quantile_s(1.0) == 30
    # A pause still going after 2 s is the long kind: 28 s are left.
    assert stats.expected_remaining_s(2.0) == pytest.approx(28.0)
    # Past every observation, assume it lasts as long again.
    assert stats.expected_remaining_s(100.0) == 100.0


def test_window_forgets_old_observations():
    stats = PauseStats(ewma_s=1.0, window=4)
    for x in [100, 1, 1, 1, 1]:
        stats.observe(x)
    assert stats.quantile_s(1.0) == 1


def test_estimator_learns_per_tool_with_priors_and_combinations():
    est = PauseEstimator(prior_s=5.0, priors={"ask_human": 120.0})
    assert est.expected_s(["web_search"]) == 5.0 and est.expected_s(["ask_human"]) == 120.0
    for _ in range(20):
        est.observe(["calculator"], 0.05)
        est.observe(["web_search"], 2.0)
    assert est.expected_s(["calculator"]) == pytest.approx(0.05)
    # An unseen combination waits for its slowest known member (calls run side by side).
    assert est.expected_s(["web_search", "calculator"]) == pytest.approx(2.0)
    est.observe(["web_search", "calculator"], 3.0)
    assert est.expected_s(["calculator", "web_search"]) == 3.0


def test_staged_keep_picks_the_horizon_that_minimises_expected_cost():
    stats = PauseStats(ewma_s=1.0)
    for x in [1.0] * 9 + [100.0]:
        stats.observe(x)
    # Keeping costs 1 per second, evicting 20: hold 1 s (cost 1), and pay 20 for the one pause in ten that goes
    # on: 1 + 2 = 3, against 10.9 for keeping through and 20 for evicting at once.
    assert stats.staged_keep(0.0, keep_rate=1.0, evict_cost=20.0) == (1.0, pytest.approx(3.0))
    # When eviction is dearer than the long wait, the best horizon is the longest pause: keep through.
    assert stats.staged_keep(0.0, keep_rate=1.0, evict_cost=1000.0) == (100.0, pytest.approx(10.9))
    # Once past the quick ones only the long pause is left: no horizon short of it.
    assert stats.staged_keep(5.0, keep_rate=1.0, evict_cost=20.0) is None
