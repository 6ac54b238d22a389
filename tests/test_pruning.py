from __future__ import annotations

import pytest

from attn_search.search.pruning import MOASHA

DIRS = ["maximize", "minimize"]


def test_waits_for_evidence_then_keeps_top_fraction() -> None:
    rule = MOASHA(DIRS, eta=3)
    assert rule.report("a", 10, [0.1, 5.0])  # alone at the rung: continue
    assert rule.report("b", 10, [0.2, 5.0])
    # c is dominated by a and b (worse accuracy, more compute); 3 trials -> keep top 1
    assert not rule.report("c", 10, [0.05, 6.0])
    # d is on the first front (cheapest), so it is kept even though accuracy is low
    assert rule.report("d", 10, [0.01, 1.0])


def test_ties_on_the_cut_off_front_all_continue() -> None:
    rule = MOASHA(DIRS, eta=3, min_trials=1)
    for i, point in enumerate([[0.9, 9.0], [0.5, 5.0], [0.1, 1.0]]):  # one front of three
        assert rule.report(i, 1, point)


def test_rungs_are_independent_and_nan_ranks_last() -> None:
    rule = MOASHA(DIRS, eta=2, min_trials=2)
    assert rule.report("x", 1, [float("nan"), 1.0]) is True  # not enough evidence yet
    assert rule.report("y", 1, [0.5, 1.0]) is True
    assert rule.report("x", 2, [0.9, 1.0]) is True  # first at rung 2
    rule.record("z", 1, [0.6, 1.0])
    assert rule.report("x", 1, [float("nan"), 1.0]) is False


def test_invalid_eta() -> None:
    with pytest.raises(ValueError, match="eta=1"):
        MOASHA(DIRS, eta=1)


def test_grace_period_protects_early_rungs() -> None:
    rule = MOASHA(DIRS, eta=2, min_trials=1, grace_period=50)
    rule.report("good", 25, [0.9, 1.0])
    assert rule.report("bad", 25, [0.1, 2.0])  # dominated, but before the grace period
    rule.report("good", 50, [0.9, 1.0])
    assert not rule.report("bad", 50, [0.1, 2.0])
