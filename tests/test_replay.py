"""The strategy benchmark's protocol (attn_search.replay, benchmarks/strategies.py) on small tables
built here: every strategy and the portfolio run, and the regret, rank and cost arithmetic is right."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from attn_search.replay import META, PORTFOLIO, Table, mean_ranks, portfolio, rank_with_ties, replay, run_protocol
from attn_search.search.evaluators import TableEvaluator
from attn_search.search.pareto import pareto_front
from attn_search.search.space import load_space

ROOT = Path(__file__).resolve().parent.parent
STEPS = (30, 60, 90, 120)


def write_table(path: Path, *, shift: float = 0.0) -> Path:
    """20 configurations of the sparse space with a learning curve each; accuracy rises with reach
    and falls with compute's absence (``shift`` changes which configuration is best)."""
    rows = []
    for n_heads in (2, 4):
        for lr in (0.003, 0.008):
            cells = [("dense", None, None)] + [("window", w, None) for w in (8, 32)]
            cells += [("strided", None, s) for s in (8, 32)]
            for pattern, window, stride in cells:
                reach = {"dense": 1.0, "window": (window or 0) / 40, "strided": 8 / (stride or 8)}[pattern]
                acc = float(np.clip(0.2 + 0.6 * reach + (0.1 if lr == 0.008 else 0) - shift * (n_heads == 4), 0, 1))
                flops = 1e6 * (1 + n_heads / 4 + {"dense": 1.0, "window": (window or 0) / 64, "strided": 0.2}[pattern])
                curve = ";".join(f"{s}:{acc * (s / 120) ** 2:.6g}" for s in STEPS)
                rows.append({"trial": len(rows), "state": "complete", "accuracy": acc, "flops": flops, "steps": 120,
                             "d_model": 64, "n_layers": 1, "n_heads": n_heads, "pattern": pattern, "window": window,
                             "stride": stride, "dropout": 0.0, "attn_dropout": 0.0, "weight_decay": 0.01,
                             "label_smoothing": 0.0, "lr": lr, "curve": curve})  # fmt: skip
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def brute_hypervolume(points: list[tuple[float, float]], lo: float, hi: float) -> float:
    """2-D hypervolume of (accuracy up, compute down) in the unit box, by a fine grid (independent
    of attn_search.search.pareto)."""
    acc = np.linspace(0, 1, 801)[:-1] + 0.5 / 800
    comp = np.linspace(0, 1, 801)[:-1] + 0.5 / 800
    A, C = np.meshgrid(acc, comp)
    covered = np.zeros_like(A, dtype=bool)
    for a, c in points:
        covered |= (a >= A) & ((c - lo) / (hi - lo) <= C)
    return float(covered.mean())


@pytest.fixture(scope="module")
def tables(tmp_path_factory: pytest.TempPathFactory) -> list[Table]:
    tmp = tmp_path_factory.mktemp("tables")
    space = load_space("sparse").with_compute("flops")  # as benchmarks/strategies.py counts it
    return [Table(write_table(tmp / "a.csv"), space), Table(write_table(tmp / "b.csv", shift=0.3), space)]


def test_regret_is_one_minus_the_searchs_hypervolume_over_the_tables_best(tables: list[Table]) -> None:
    table = tables[0]
    lo, hi = table.bounds["flops"]
    everything = [table.point(k) for k in table.keys]
    assert table.best_hv == pytest.approx(brute_hypervolume(everything, lo, hi), abs=2e-3)
    r = replay(table, "random", trials=8, seed=3)
    assert len(r.proposed) == len(set(r.proposed)) == 8  # duplicates are answered, not run
    for i in range(8):
        found = [table.point(k) for k in r.proposed[: i + 1]]
        expected = 1 - brute_hypervolume(found, lo, hi) / table.best_hv
        assert table.regret(r.hypervolume[i]) == pytest.approx(expected, abs=5e-3)
    assert r.steps == [120 * (i + 1) for i in range(8)]  # no early stopping: every trial its full curve


def test_early_stopping_replays_the_curves_and_charges_only_the_steps_run(tables: list[Table]) -> None:
    off = replay(tables[0], "random", trials=20, seed=0)
    on = replay(tables[0], "random", trials=20, seed=0, early_stopping=True)
    assert on.proposed == off.proposed  # random ignores results, so the same trials in the same order
    assert on.pruned > 0 and on.steps[-1] == off.steps[-1] - sum(120 - s for s in on_stopped_at(on, tables[0]))
    assert on.steps[-1] < off.steps[-1]


def on_stopped_at(r: object, table: Table) -> list[int]:
    """Steps at which MO-ASHA stopped trials of ``r``: a stopped trial's cost is a rung before 120."""
    steps = np.diff([0, *r.steps])  # type: ignore[attr-defined]
    return [int(s) for s in steps if s < 120]


def test_the_portfolio_covers_the_other_tables_front_first(tables: list[Table]) -> None:
    a = tables[0]
    same = Table(a.path, a.space)  # a table identical to a: its portfolio must find a's whole front
    configs = portfolio([same], size=len(a.keys))
    points = np.array([a.point(k) for k in a.keys])
    front = pareto_front(points, a.space.directions)
    assert 1 < len(front) < len(a.keys)
    r = replay(a, PORTFOLIO, trials=len(a.keys), seed=0, portfolio_configs=configs)
    first_full = next(i for i, h in enumerate(r.hypervolume) if a.regret(h) < 1e-9)
    assert first_full + 1 <= len(front)  # no configuration off a's front comes before the front is complete
    assert replay(a, PORTFOLIO, trials=5, seed=1, portfolio_configs=configs).proposed == r.proposed[:5]  # no seed


def test_ranks_share_ties_and_average_over_tables() -> None:
    assert rank_with_ties([0.3, 0.1, 0.3, 0.2]) == [3.5, 1.0, 3.5, 2.0]
    regret = {"t1": {10: {"a": [0.1, 0.1], "b": [0.2, 0.3]}}, "t2": {10: {"a": [0.3], "b": [0.3]}}}
    assert mean_ranks(regret, [10], ["a", "b"]) == {10: {"a": 1.25, "b": 1.75}}


@pytest.mark.slow  # (15-31 s: the default suite stays under 10 minutes on 2 cores)
def test_every_strategy_and_the_portfolio_run_through_the_protocol(tables: list[Table], tmp_path: Path) -> None:
    strategies = ["random", "tpe", "nsga2", "gp", "ppo-grid", "ppo", META, PORTFOLIO]
    result = run_protocol(tables, strategies, [3, 6], [0, 1], meta_steps=300, agents_dir=tmp_path)
    # one agent per held-out table, with the grid it acts on beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loo-a.json", "loo-a.zip", "loo-b.json", "loo-b.zip"]
    for table in ("a", "b"):
        for budget in (3, 6):
            for s in strategies:
                regrets = result["regret"][table][budget][s]
                assert len(regrets) == 2, (table, budget, s)
        # the protocol's bookkeeping: random's regret at each budget is that of its own replay's
        # first trials, recomputed here from the table's rows
        t = next(u for u in tables if u.name == table)
        for seed in (0, 1):
            r = replay(t, "random", trials=6, seed=seed)
            for budget in (3, 6):
                points = [t.point(k) for k in r.proposed[:budget]]
                assert result["regret"][table][budget]["random"][seed] == pytest.approx(t.regret(t.hypervolume(points)))
        # budgets are prefixes for random: more trials never raise its regret
        assert all(
            r6 <= r3
            for r3, r6 in zip(result["regret"][table][3]["random"], result["regret"][table][6]["random"], strict=True)
        )
        for s in strategies:
            assert result["steps"][table][6][s] == [6 * 120] * 2
            assert all(st <= 6 * 120 for st in result["early_stopping"][table][s]["steps"])
            assert len(result["curves"][table][s][0]) == 6
    expected = mean_ranks(result["regret"], [3, 6], strategies)
    assert result["ranks"] == expected


def test_the_benchmark_script_writes_its_results_and_plot(tables: list[Table], tmp_path: Path) -> None:
    out = tmp_path / "results"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "strategies.py"), "--tables", str(tables[0].path),
           str(tables[1].path), "--strategies", "random", "tpe", PORTFOLIO, "--budgets", "3", "6", "--seeds", "3",
           "--jobs", "1", "--out", str(out)]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True)
    assert "mean rank across 2 tables" in run.stdout and "discrimination" in run.stdout
    data = json.loads((out / "strategies.json").read_text())
    assert set(data["regret"]) == {"a", "b"} and data["wall_seconds"] > 0
    assert (out / "strategies.png").stat().st_size > 1000
    bad = subprocess.run([*cmd[:2], "--tables", str(tmp_path / "none.csv")], capture_output=True, text=True)
    assert bad.returncode == 2 and "no such table" in bad.stderr


def test_a_recorded_table_gives_its_curves(tables: list[Table]) -> None:
    lookup = TableEvaluator(tables[0].path, load_space("sparse"))
    values = {"n_heads": 2, "pattern": "dense", "dropout": 0.0, "attn_dropout": 0.0, "weight_decay": 0.01,
              "label_smoothing": 0.0, "lr": 0.008}  # fmt: skip
    curve = lookup.curve(values)
    assert [s for s, _ in curve] == list(STEPS) and curve[-1][1] == pytest.approx(0.9)
    with pytest.raises(KeyError, match="no row"):
        lookup.curve({**values, "lr": 0.005})


def test_protocol_jobs_give_budget_aware_strategies_a_search_per_budget_and_respect_a_cap() -> None:
    from attn_search.replay import protocol_jobs

    jobs = protocol_jobs(2, ["random", "tpe", "gp"], [10, 20, 50], [0, 1], early_stopping=["random", "gp"],
                         max_budget={"gp": 20})  # fmt: skip
    by = {(j.strategy, j.trials, j.early_stopping) for j in jobs}
    assert {t for s, t, es in by if s == "random" and not es} == {50}  # budgets are prefixes of one search
    assert {t for s, t, es in by if s == "tpe" and not es} == {10, 20, 50}  # TPE's startup depends on its budget
    assert {t for s, t, es in by if s == "gp"} == {10, 20} and ("random", 50, True) in by  # capped, no 50-trial ES
    assert jobs[0].strategy == "gp" and len(jobs) == 2 * 2 * (1 + 1 + 3 + 2)


def test_a_table_search_replays_each_trials_recorded_rungs_to_the_loops_early_stopping(
    tables: list[Table], tmp_path: Path
) -> None:
    """A search with ``--evaluator table:`` runs like a replay: the local backend says each looked-up
    trial's recorded rungs (the table backend of the event protocol), MO-ASHA stops some, and a
    stopped trial keeps the accuracy and steps of the rung it stopped at; the others run to the
    table's last step. The replay of the same table, strategy and seed proposes the same trials
    and stops the same ones."""
    from attn_search.search.loop import SearchOptions, run_search

    table = tables[0]
    out = tmp_path / "run"
    run_search(SearchOptions(space="sparse", evaluator=f"table:{table.path}", strategy="random", trials=16, seed=2, compute="flops",
                             out=str(out), quiet=True))  # fmt: skip
    trials = pd.read_csv(out / "trials.csv")
    lookup = TableEvaluator(table.path, table.space)
    pruned = trials[trials["state"] == "pruned"]
    assert len(pruned) > 0 and (trials["state"] == "complete").sum() > 0
    for _, row in trials.iterrows():
        values = {p.name: row[p.name] for p in table.space.params if p.name in row and not pd.isna(row[p.name])}
        curve = dict(lookup.curve(values))
        assert row["steps"] in STEPS and row["accuracy"] == pytest.approx(curve[int(row["steps"])], abs=1e-6)
        assert (row["steps"] < 120) == (row["state"] == "pruned")
    again = replay(table, "random", trials=16, seed=2, early_stopping=True)
    assert again.pruned == len(pruned) and again.steps[-1] == int(trials["steps"].sum())


def test_a_table_recorded_without_attention_flops_counts_them_at_its_recorded_length() -> None:
    """The shipped tables predate the ``attn_flops`` and ``attn_tile_flops`` columns: a lookup counts
    them from each row's configuration at the length the table's header names (L=64 here, not the
    space's task's 256), so a table search on the sparse space (tiles its own objective, entries on
    request) ranks compute as a trial would."""
    from attn_search.engine.cost import model_attention_flops, model_attention_tile_flops
    from attn_search.engine.metrics import ATTN_FLOPS, ATTN_TILE_FLOPS

    space = load_space("sparse")
    assert space.metrics == ["accuracy", ATTN_TILE_FLOPS]
    path = Path(__file__).resolve().parents[1] / "tables" / "ngram-64.csv"
    assert ATTN_FLOPS not in pd.read_csv(path, comment="#", nrows=1).columns
    lookup = TableEvaluator(path, space)
    for _, row in lookup.frame.sample(20, random_state=0).iterrows():
        values = {p.name: row[p.name] for p in space.params if p.name in row and not pd.isna(row[p.name])}
        assert lookup(space.make_config(values), values)[ATTN_FLOPS] == model_attention_flops(
            space.make_config(values), seq_len=64
        )
        # and the tiles FlexAttention would compute: one tile at L=64, dense's for every pattern
        assert (
            lookup(space.make_config(values), values)[ATTN_TILE_FLOPS]
            == model_attention_tile_flops(space.make_config(values), seq_len=64)
            == model_attention_tile_flops(space.make_config({**values, "pattern": "dense"}), seq_len=64)
        )
    low, high = lookup.bounds(space, ATTN_FLOPS, [])
    assert high / low > 4  # at L=64 the grid's attention spans 4x and more; its whole model's FLOPs 1.1x
    whole = lookup.frame["flops"]
    assert whole.max() / whole.min() < 1.2
