"""The learned first configurations of ``--strategy ppo`` (attn_search.strategies.head)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest

from attn_search.replay import Table, portfolio
from attn_search.search.space import load_space, parse_space
from attn_search.strategies import StrategyContext, make_strategy
from attn_search.strategies.base import Outcome, ask_new
from attn_search.strategies.candidates import SHIPPED, CandidateStrategy, TableTask, provenance
from attn_search.strategies.head import HEAD_SIZE, PORTFOLIO_SIZE, HeadFirst, head_values, learn_head, stored_head

ROOT = Path(__file__).resolve().parent.parent
TABLES = [ROOT / "tables" / "mqar-64.csv", ROOT / "tables" / "ngram-64.csv"]


class Recorder:
    """An inner strategy that proposes at random and records what it is told."""

    name = "inner"

    def __init__(self, space: Any) -> None:
        self.space, self.told, self.asked = space, [], 0
        self.sampler = optuna.samplers.RandomSampler(seed=0)

    def start(self, history: Any) -> str | None:
        return None

    def ask(self) -> dict[str, Any]:
        self.asked += 1
        return self.space.active_values(self.space.suggest(optuna.create_study(sampler=self.sampler).ask()))

    def tell(self, values: dict[str, Any], outcome: Outcome) -> None:
        self.told.append(values)

    def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def tasks() -> list[TableTask]:
    return [TableTask(p) for p in TABLES]  # compute at the task's length only


def test_the_first_pick_is_the_configuration_that_covers_the_tables_fronts_best(tasks: list[TableTask]) -> None:
    # checked against the benchmark's own hypervolume (replay.Table), not the head's arithmetic
    space = load_space("sparse").with_compute("flops")  # as the heads and benchmarks count it
    tables = [Table(p, space) for p in TABLES]
    keys = [k for k in tables[0].keys if all(k in t.lookup.rows for t in tables[1:])]
    score = [np.mean([t.hypervolume([t.point(k)]) / t.best_hv for t in tables]) for k in keys]
    best = tables[0].values(keys[int(np.argmax(score))])
    head = learn_head(tasks, 3)
    assert head_values(tables[0].space, head[0]) == pytest.approx(best)
    assert len({json.dumps(c, sort_keys=True) for c in head}) == 3  # no configuration twice


def test_a_list_learned_until_covered_ends_where_no_configuration_adds_anything(tasks: list[TableTask]) -> None:
    """``until_covered``: the greedy list stops once it covers every table's front (a further pick
    would add nothing, and come in row order), as ``--strategy portfolio``'s lists do."""
    covered = learn_head(tasks, 400, ("task",), until_covered=True)
    common = [k for k in tasks[0].keys if all(k in t.keys for t in tasks[1:])]
    assert 0 < len(covered) < len(common)
    assert learn_head(tasks, len(covered) + 5, ("task",))[: len(covered)] == covered  # the same greedy list
    assert learn_head(tasks, len(covered) + 5, ("task",), until_covered=True) == covered  # nothing added after


def test_a_head_at_one_length_is_the_portfolio_baselines_first_configurations() -> None:
    """learn_head at the task's length picks what replay.portfolio (the benchmark's baseline, its
    own hypervolume code) picks, all five in order: portfolio+gp's head and ppo's are the same list."""
    paths = [*TABLES, ROOT / "tables" / "delay-64.csv"]
    space = load_space("sparse").with_compute("flops")
    tables = [Table(p, space) for p in paths]
    head = learn_head([TableTask(p) for p in paths], 5, ("task",))
    assert [head_values(tables[0].space, c) for c in head] == portfolio(tables, 5)
    with pytest.raises(ValueError, match="count compute at the lengths"):
        learn_head([TableTask(p) for p in paths], 5, ("deploy",))  # (no deployment costs given)


def test_a_search_takes_the_head_of_the_length_nearest_where_it_counts_compute_and_of_its_measure() -> None:
    """Near the deployment length a search counting 128-tiles (the sparse space's own objective)
    takes the tile head, one counting kept entries the kept-entry head."""
    info = {"heads": {"task": [{"n": 1}], "deploy": [{"n": 2}], "tiles": [{"n": 4}]}, "deploy_len": 4096}
    tiles = load_space("sparse")
    assert tiles.metrics[1] == "attn_tile_flops"
    for space, far in ((tiles, 4), (tiles.with_compute("attn_flops"), 2), (tiles.with_compute("flops"), 2)):
        for target, want in ((None, 1), (64, 1), (128, 1), (1024, far), (4096, far), (16384, far)):
            assert stored_head(info, dataclasses.replace(space, target_len=target), 64) == [{"n": want}], target
    # a YAML may list compute before accuracy: the space still reads accuracy first, so the head is its compute's
    listed = parse_space({"name": "s", "objectives": {"attn_tile_flops": "minimize", "accuracy": "maximize"},
                          "target_len": 4096, "params": {"window": {"type": "int", "low": 4, "high": 64}},
                          "fixed": {"pattern": "window"}})  # fmt: skip
    assert listed.metrics == ["accuracy", "attn_tile_flops"]
    assert stored_head(info, listed, 64) == [{"n": 4}]
    older = {"heads": {"task": [{"n": 1}], "deploy": [{"n": 2}]}, "deploy_len": 4096}  # (before the tile head)
    assert stored_head(older, tiles, 64) == [{"n": 2}]
    assert stored_head({"head": [{"n": 3}]}, tiles, 64) == [{"n": 3}]  # a sidecar from before the per-length heads
    assert stored_head(None, tiles, 64) == []


def test_the_head_is_proposed_first_then_the_inner_strategy_and_it_is_told_everything(
    tasks: list[TableTask],
) -> None:
    space = load_space("sparse")
    head = learn_head(tasks, 2)
    outside = {**head[0], "d_model": 128}  # a fixed field the space does not search
    inner = Recorder(space)
    strategy = HeadFirst(inner, [head[0], outside, head[1]], space)
    assert strategy.skipped == 1
    study = optuna.create_study(directions=space.directions)
    strategy.start([])
    proposed = []
    for _ in range(4):  # as the loop asks: each proposal becomes a trial of its study
        trial = ask_new(strategy, study, space, {})
        values = space.active_values(dict(trial.params))
        study.tell(trial, [0.5, 1e7])
        strategy.tell(values, Outcome("complete", {"accuracy": 0.5}, (0.5, 1e7)))
        proposed.append(values)
    assert proposed[:2] == [head_values(space, head[0]), head_values(space, head[1])]
    assert inner.asked == 2 and inner.told == proposed
    assert [t.user_attrs["proposed_by"] for t in study.trials] == ["inner-head"] * 2 + ["inner"] * 2


def test_a_resumed_search_does_not_repeat_the_head_and_a_space_that_cannot_build_it_skips_it(
    tasks: list[TableTask],
) -> None:
    space = load_space("sparse")
    head = learn_head(tasks, 2)
    again = HeadFirst(Recorder(space), head, space)
    first = head_values(space, head[0]) or {}
    ran = {k: float(v) if isinstance(v, int) else v for k, v in first.items()}  # as a store may give them: 8.0 for 8
    assert isinstance(ran["window"], float) and isinstance(first["window"], int)
    again.start([(ran, Outcome("complete", {"accuracy": 0.5}, (0.5, 1e7)))])
    assert again.queue == [head_values(space, head[1])]
    # a search resumed past its first proposals, started with another head, does not go back to this one
    other = [(dict(v, lr=0.001), Outcome("complete", {"accuracy": 0.5}, (0.5, 1e7))) for v in (first, first)]
    midway = HeadFirst(Recorder(space), head, space)
    midway.start(other[:1])
    assert midway.queue == [head_values(space, head[0])]  # one trial in: one of the two head places left
    past = HeadFirst(Recorder(space), head, space)
    past.start(other)
    assert past.queue == []
    dense = load_space("dense")  # no sparsity pattern to choose: none of the head fits
    assert HeadFirst(Recorder(dense), head, dense).queue == []


def test_ppo_starts_with_the_head_of_the_length_its_compute_counts_at_unless_told_none(tmp_path: Path) -> None:
    """The sidecar holds a head per length and measure, each the greedy cover of the policy's
    tables' fronts with compute counted so; a search counting compute at a target length (the
    sparse space's 4096) starts with the deployment length's, in 128-tiles as the sparse space counts
    it or over kept entries with ``--compute attn_flops``; one at the task's length with the task's."""
    info = provenance(SHIPPED)
    assert info is not None and sorted(info["heads"]) == ["deploy", "task", "tiles"], "make agent writes the heads"
    assert "head" not in info  # (the one list for both lengths is gone)
    assert set(info["head_tables"]) == set(info["tables"])  # learned from what the policy saw
    tables = [TableTask(ROOT / "tables" / f"{t}.csv", deploy_len=info["deploy_len"]) for t in info["head_tables"]]
    for n in ("task", "deploy"):
        assert info["heads"][n][:HEAD_SIZE] == learn_head(tables, lengths=(n,))  # greedy: a list's first are a list
    tiles = [TableTask(ROOT / "tables" / f"{t}.csv", deploy_len=info["deploy_len"], deploy_metric="attn_tile_flops")
             for t in info["head_tables"]]  # fmt: skip
    assert info["heads"]["tiles"][:HEAD_SIZE] == learn_head(tiles, lengths=("deploy",))
    assert info["heads"]["task"] == learn_head(tables, PORTFOLIO_SIZE, lengths=("task",), until_covered=True)
    assert info["heads"]["tiles"] == learn_head(tiles, PORTFOLIO_SIZE, lengths=("deploy",), until_covered=True)
    assert len(info["heads"]["task"]) == PORTFOLIO_SIZE > len(info["heads"]["tiles"])  # tiles: every front covered
    assert len({json.dumps(info["heads"][n], sort_keys=True) for n in ("task", "deploy", "tiles")}) == 3
    space = load_space("sparse")
    assert space.target_len == info["deploy_len"]
    entries = space.with_compute("attn_flops")
    plain_len = dataclasses.replace(space, target_len=None)
    for searched, length in ((space, "tiles"), (entries, "deploy"), (plain_len, "task")):
        context = StrategyContext(space=searched, seed=0, trials=10, slots=1, run_dir=tmp_path, resume=False)
        shipped = make_strategy("ppo", context)
        assert isinstance(shipped, HeadFirst) and isinstance(shipped.inner, CandidateStrategy)
        assert shipped.queue == [head_values(searched, c) for c in info["heads"][length][:HEAD_SIZE]]
        assert len(shipped.queue) == 5  # the sparse space builds every one of them
    plain = make_strategy("ppo", StrategyContext(space=space, seed=0, trials=10, slots=1, run_dir=tmp_path,
                                                 resume=False, options={"head": "none"}))  # fmt: skip
    assert isinstance(plain, CandidateStrategy)


def test_portfolio_gp_proposes_the_shipped_head_then_gp_and_says_so(tmp_path: Path) -> None:
    """``--strategy portfolio+gp``: the shipped policy's learned first configurations (those the
    space can build), then Optuna's GP sampler, which is told the head's results too."""
    info = provenance(SHIPPED)
    assert info is not None
    space = load_space("sparse")
    context = StrategyContext(space=space, seed=0, trials=8, slots=1, run_dir=tmp_path, resume=False)
    strategy = make_strategy("portfolio+gp", context)
    assert isinstance(strategy, HeadFirst) and strategy.name == "portfolio+gp"
    head = [head_values(space, c) for c in info["heads"]["tiles"][:5]]  # (the sparse space counts tiles at L=4096)
    assert len(head) == 5 and strategy.queue == head
    line = strategy.start([]) or ""
    assert "portfolio+gp: 5 learned first configurations, then Optuna's GP sampler" in line
    study = optuna.create_study(directions=space.directions)
    proposed = []
    for i in range(7):
        trial = ask_new(strategy, study, space, {})
        assert trial is not None
        values = space.active_values(dict(trial.params))
        acc = 0.3 + 0.05 * i
        study.tell(trial, [acc, 1e7 * (1 + i)])
        strategy.tell(values, Outcome("complete", {"accuracy": acc}, (acc, 1e7 * (1 + i))))
        proposed.append(values)
    assert proposed[:5] == head
    assert [t.user_attrs["proposed_by"] for t in study.trials] == ["portfolio"] * 5 + ["gp"] * 2
    gp_study = strategy.inner.study  # type: ignore[attr-defined]
    assert len(gp_study.get_trials(states=[optuna.trial.TrialState.COMPLETE])) == 7  # told the head's too


def test_portfolio_proposes_the_whole_shipped_list_then_tpe_and_says_so(tmp_path: Path) -> None:
    """``--strategy portfolio``: every configuration of the shipped list for the length and measure
    the search counts compute in (the family-out benchmark's ``portfolio``, whose first five are
    ``portfolio+gp``'s and ``ppo``'s), then Optuna's TPE sampler, told the list's results too."""
    info = provenance(SHIPPED)
    assert info is not None
    space = load_space("sparse")
    for searched, length in ((space, "tiles"), (dataclasses.replace(space, target_len=None), "task")):
        context = StrategyContext(space=searched, seed=0, trials=60, slots=1, run_dir=tmp_path, resume=False)
        strategy = make_strategy("portfolio", context)
        listed = [head_values(searched, c) for c in info["heads"][length]]
        assert isinstance(strategy, HeadFirst) and strategy.name == "portfolio"
        assert None not in listed and strategy.queue == listed  # the sparse space builds all of them
    assert len(listed) == PORTFOLIO_SIZE  # (the task's list: its fronts are never all covered)
    line = strategy.start([]) or ""
    assert f"portfolio: {PORTFOLIO_SIZE} learned first configurations, then Optuna's TPE sampler" in line
    study = optuna.create_study(directions=space.directions)
    for i in range(PORTFOLIO_SIZE + 2):
        trial = ask_new(strategy, study, searched, {})
        assert trial is not None
        values = searched.active_values(dict(trial.params))
        assert i >= PORTFOLIO_SIZE or values == listed[i]
        acc = 0.3 + 0.001 * i
        study.tell(trial, [acc, 1e7 * (1 + i)])
        strategy.tell(values, Outcome("complete", {"accuracy": acc}, (acc, 1e7 * (1 + i))))
    assert [t.user_attrs["proposed_by"] for t in study.trials] == ["portfolio"] * PORTFOLIO_SIZE + ["tpe"] * 2
    tpe_study = strategy.inner.study  # type: ignore[attr-defined]
    assert len(tpe_study.get_trials(states=[optuna.trial.TrialState.COMPLETE])) == PORTFOLIO_SIZE + 2
