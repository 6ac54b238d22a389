"""Strategies replayed on recorded tables: the fast path of the strategy benchmark.

A replay is a search whose trials are looked up in a table (``attn-search record``) instead of
trained, run by the search loop itself (:class:`~attn_search.search.loop.SearchLoop`), as
syne-tune's simulator backend runs its tuner on recorded results: the same strategies asked the
same way (duplicates answered, not run), the local backend replaying each looked-up trial's
recorded rungs (:class:`~attn_search.backends.base.SlotRun`), so the loop's early-stopping rule
(MO-ASHA) stops it where it would have stopped the training and a stopped trial costs only the
steps it ran, and the front scored with the one hypervolume definition
(:func:`~attn_search.report.outputs.hypervolume_of_points`, with the table's compute range).

What differs from a search is only what is kept: a search writes every trial to SQLite and
rewrites the run dir after each one (about 135 ms a trial), so that a crash loses nothing; a
replay has nothing to lose and a benchmark runs tens of thousands of replayed trials, so its
study lives in memory and it writes nothing. What a replay returns is the hypervolume and the
training steps spent after every trial, so that every budget up to ``trials`` is a prefix of one
replay (for strategies that do not know their budget).

The zero-shot portfolio (:func:`portfolio`) is the transfer baseline: the configurations that
cover other tables' fronts best, greedily, proposed in that order (:func:`portfolio_strategy`).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import tempfile
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import optuna

from attn_search.engine import metrics as M
from attn_search.report.outputs import RunOutputs, SearchSummary, hypervolume_of_points
from attn_search.report.progress import Progress
from attn_search.search.evaluators import TableEvaluator, restrict_to_evaluator, table_key
from attn_search.search.space import SearchSpace
from attn_search.strategies import StrategyContext, make_strategy
from attn_search.strategies.base import FirstThese, Strategy

PORTFOLIO = "portfolio"
PORTFOLIO_GP = "portfolio+gp"
"""The portfolio's first :data:`PORTFOLIO_HEAD` configurations, then Optuna's GP sampler."""
PORTFOLIO_HEAD = 5
META = "ppo-meta"
"""The PPO agent meta-trained on the other tables (leave-one-table-out), then searching as ``ppo``
with ``--agent`` (:func:`~attn_search.strategies.agent.meta_train`)."""


class Table:
    """A recorded table ready for replays: lookups, curves, compute range and best hypervolume."""

    def __init__(self, path: str | Path, space: SearchSpace) -> None:
        self.path = Path(path)
        self.name = self.path.stem
        self.lookup = TableEvaluator(self.path, space)
        self.space = space = restrict_to_evaluator(space, self.lookup)  # proposals stay on the table's grid
        self.lookup.space = space
        self.compute = space.metrics[1]
        lo, hi = float(self.lookup.frame[self.compute].min()), float(self.lookup.frame[self.compute].max())
        self.bounds: dict[str, tuple[float, float] | None] = {self.compute: (lo, hi)}
        self.keys = list(self.lookup.rows)
        self.best_hv = self.hypervolume([self.point(k) for k in self.keys])
        if self.best_hv <= 0:
            raise ValueError(f"{self.path}: every row has accuracy 0, so no hypervolume to compare against")

    def point(self, key: tuple[Any, ...]) -> tuple[float, float]:
        row = self.lookup.rows[key]
        return row[M.ACCURACY], row[self.compute]

    def values(self, key: tuple[Any, ...]) -> dict[str, Any]:
        """The active parameter values of a row (as a strategy would propose them)."""
        return {name: value for name, value in key if value is not None}

    def hypervolume(self, points: Sequence[Sequence[float]]) -> float:
        return hypervolume_of_points(np.asarray(points, dtype=float).reshape(-1, 2), self.space, self.bounds)

    def regret(self, hv: float) -> float:
        """Normalised-hypervolume regret: ``1 - hv / best``, 0 for a search that found the table's front."""
        return 1.0 - hv / self.best_hv


@dataclasses.dataclass
class Replay:
    """One replayed search: after trial ``i`` (0-based), ``hypervolume[i]`` and ``steps[i]``
    (training steps spent so far; a stopped trial counts the steps it ran)."""

    strategy: str
    table: str
    seed: int
    trials: int
    early_stopping: bool
    hypervolume: list[float]
    steps: list[int]
    pruned: int = 0
    proposed: list[tuple[Any, ...]] = dataclasses.field(default_factory=list)
    """The table key of each trial's configuration, in order."""

    def at(self, budget: int) -> tuple[float, int]:
        """Hypervolume and steps after ``budget`` trials (the last if the search ran fewer)."""
        i = min(budget, len(self.hypervolume)) - 1
        return (self.hypervolume[i], self.steps[i]) if i >= 0 else (0.0, 0)


def portfolio_strategy(configurations: Sequence[dict[str, Any]], context: StrategyContext) -> Strategy:
    """The portfolio as a strategy: its configurations in order, then random proposals (the list
    (:func:`portfolio`) is greedy while a configuration adds hypervolume on the tables it learns
    from; once none adds any, the rest of it follows the tables' row order)."""
    return FirstThese(make_strategy("random", context), configurations, name=PORTFOLIO, label=PORTFOLIO)


def portfolio(tables: Sequence[Table], size: int) -> list[dict[str, Any]]:
    """Up to ``size`` configurations chosen greedily to maximise the mean, over ``tables``, of the
    hypervolume they reach as a fraction of each table's best (configurations every table holds).
    Once every table's front is covered no configuration adds anything, and the remaining picks
    are the first unchosen rows in the first table's order (not random)."""
    if not tables:
        raise ValueError("a portfolio needs at least one table to learn from")
    common = [k for k in tables[0].keys if all(k in t.lookup.rows for t in tables[1:])]
    chosen: list[tuple[Any, ...]] = []
    fronts: list[list[tuple[float, float]]] = [[] for _ in tables]
    while len(chosen) < min(size, len(common)):
        best_key, best_score = None, -1.0
        for key in common:
            if key in chosen:
                continue
            gains = [t.hypervolume([*f, t.point(key)]) / t.best_hv for t, f in zip(tables, fronts, strict=True)]
            score = float(np.mean(gains))
            if score > best_score + 1e-12:
                best_key, best_score = key, score
        assert best_key is not None
        chosen.append(best_key)
        for t, f in zip(tables, fronts, strict=True):
            f.append(t.point(best_key))
    return [tables[0].values(k) for k in chosen]


def replay(
    table: Table,
    strategy: str,
    *,
    trials: int,
    seed: int,
    early_stopping: bool = False,
    eta: float = 3.0,
    portfolio_configs: Sequence[dict[str, Any]] | None = None,
    options: dict[str, Any] | None = None,
) -> Replay:
    """Run ``strategy`` (a strategy name, or :data:`PORTFOLIO` with ``portfolio_configs``) for
    ``trials`` trials on ``table``; see the module docstring."""
    from attn_search.backends import BackendOptions, LocalBackend, TrialRunner
    from attn_search.engine.trainer import Budget
    from attn_search.search.loop import SearchLoop
    from attn_search.search.plan import RunPlan, SearchOptions

    space = table.space
    optuna.logging.set_verbosity(optuna.logging.ERROR)

    def make(context: StrategyContext) -> Strategy:
        if strategy == PORTFOLIO:
            return portfolio_strategy(portfolio_configs or [], context)
        if strategy == PORTFOLIO_GP:  # its first configurations, then the GP sampler
            head = list(portfolio_configs or [])[:PORTFOLIO_HEAD]
            return FirstThese(make_strategy("gp", context), head, name=PORTFOLIO_GP, label=PORTFOLIO)
        return make_strategy(strategy, context)

    with tempfile.TemporaryDirectory(prefix="attn-replay-") as run_dir:
        evaluator = f"table:{table.path.resolve()}"
        steps = max(s for c in table.lookup.curves.values() for s, _ in c)
        budget = Budget(steps=max(1, steps), rungs=1)
        plan = RunPlan(
            options=SearchOptions(space=str(table.path), strategy=strategy, trials=trials, seed=seed, evaluator=evaluator),
            space_spec=str(table.path), space=space, task=space.task, task_kwargs={}, budget=budget, trials=trials,
            time_budget=None, population=1, confirm=0, out=Path(run_dir), storage=None, study_name="replay",
            strategy=strategy, strategy_options=dict(options or {}), constrained=False, evaluator=evaluator,
            pruner="moasha" if early_stopping else "none", eta=eta, seed=seed, device="cpu", resume=False, enqueue=(),
            attention_picture=False, backend="local", backend_options=BackendOptions(device="cpu"), max_flops=None,
            max_latency_ms=None, compute=table.compute, quiet=True,
        )  # fmt: skip
        runner = TrialRunner(space=space, budget=budget, task=space.task, task_kwargs={}, seed=seed, device="cpu",
                             evaluator=evaluator)  # fmt: skip
        runner._lookup = table.lookup  # (read once per table, not once per replay)
        loop = SearchLoop(plan, runner=runner, backend=LocalBackend(), outputs=_Unwritten(Path(run_dir), space=space),
                          progress=_Silent(), storage=optuna.storages.InMemoryStorage(), study_name="replay",
                          strategy=make, key=lambda values: table_key(space, values))  # fmt: skip
        loop.run()
        done = [t for t in loop.study.get_trials(deepcopy=False) if t.state.is_finished()
                and "duplicate_of" not in t.user_attrs]  # fmt: skip
    out = Replay(strategy, table.name, seed, trials, early_stopping, [], [])
    front: list[tuple[float, float]] = []
    spent = 0
    for t in sorted(done, key=lambda t: t.number):  # (one at a time: in the order they ended)
        out.proposed.append(table_key(space, space.active_values(dict(t.params))))
        if t.state == optuna.trial.TrialState.COMPLETE:
            front.append((float(t.values[0]), float(t.values[1])))
        elif t.state == optuna.trial.TrialState.PRUNED:
            out.pruned += 1
        else:
            raise RuntimeError(f"replayed trial {t.number} failed: {t.user_attrs.get('reason')}")
        spent += int(t.user_attrs.get("metrics", {}).get(M.STEPS, steps))
        out.hypervolume.append(table.hypervolume(front) if front else 0.0)
        out.steps.append(spent)
    if len(out.hypervolume) < trials:
        raise RuntimeError(f"strategy {strategy} proposed nothing with no trial running")
    return out


class _Unwritten(RunOutputs):
    """A replay's outputs: nothing written, nothing summarised (see the module docstring)."""

    def task_len(self) -> int | None:
        return None

    def write_tables(self, study: optuna.Study) -> None:  # type: ignore[override]
        return None

    def write_all(self, study: optuna.Study, **kwargs: Any) -> None:  # type: ignore[override]
        return None

    def stats(self, study: optuna.Study, df: Any = None) -> dict[str, Any]:
        return {}

    def summary(self, study: optuna.Study, *, wall_seconds: float, trial_seconds: float) -> SearchSummary:
        return SearchSummary(self.run_dir, 0, 0, 0, 0, 0, 0.0, wall_seconds, trial_seconds)


class _Silent(Progress):
    """A replay's console: none."""

    def __init__(self) -> None:
        super().__init__(io.StringIO(), quiet=True, total=0, compute_metric=M.FLOPS)

    def trial_done(self, *args: Any, **kwargs: Any) -> None:
        return None


def _pin_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def worker_pool(jobs: int) -> concurrent.futures.ProcessPoolExecutor:
    """A pool of ``jobs`` spawned worker processes whose torch shares this process's threads among
    them (meta-training agents, replaying searches). Why not the executor alone: a spawned worker's
    torch starts with one thread per core, so ``jobs`` workers run ``jobs`` times as many threads as
    there are cores (``benchmarks/worker_threads.py`` measures what that costs)."""
    import multiprocessing

    import torch

    threads = max(1, torch.get_num_threads() // jobs)
    return concurrent.futures.ProcessPoolExecutor(
        jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_pin_threads, initargs=(threads,)
    )


def rank_with_ties(values: Sequence[float]) -> list[float]:
    """Ranks from 1 (lowest value) with tied values sharing their mean rank."""
    arr = np.asarray(values, dtype=float)
    order = np.argsort(arr, kind="stable")
    ranks = np.empty(len(arr))
    i = 0
    while i < len(arr):
        j = i
        while j + 1 < len(arr) and arr[order[j + 1]] == arr[order[i]]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks.tolist()


def summarise(regrets: dict[Hashable, Sequence[float]]) -> dict[Hashable, dict[str, float]]:
    """Median and interquartile range of each strategy's regrets."""
    out = {}
    for name, values in regrets.items():
        q1, med, q3 = np.percentile(np.asarray(values, dtype=float), [25, 50, 75])
        out[name] = {"median": float(med), "q1": float(q1), "q3": float(q3)}
    return out


# -- the protocol ------------------------------------------------------------------------------------
BUDGET_AWARE = ("tpe", "nsga2", "gp", "cmaes", "qmc", "ppo", "ppo-grid", "a2c", META)
"""Strategies whose behaviour depends on the trial budget (startup trials, population size, the
agent's episode length): each budget is a search of its own. The others' budgets are prefixes of
one search of the largest budget."""


@dataclasses.dataclass(frozen=True)
class Job:
    """One replayed search of the protocol."""

    table: int
    strategy: str
    seed: int
    trials: int
    early_stopping: bool


def _run_job(
    tables: Sequence[Table], portfolios: Sequence[list[dict[str, Any]]], agents: Sequence[str | None], job: Job
) -> Replay:
    table = tables[job.table]
    if job.strategy == META:
        out = replay(table, "ppo-grid", trials=job.trials, seed=job.seed, early_stopping=job.early_stopping,
                     options={"agent": agents[job.table]})  # fmt: skip
        out.strategy = META
        return out
    configs = [c for c in portfolios[job.table] if table_key(table.space, c) in table.lookup.rows]
    return replay(table, job.strategy, trials=job.trials, seed=job.seed, early_stopping=job.early_stopping,
                  portfolio_configs=configs)  # fmt: skip


SLOW = ("gp", META, "ppo", "ppo-grid", "a2c", "tpe")
"""Strategies whose searches take seconds rather than milliseconds: scheduled first, so that
parallel workers finish together."""


def protocol_jobs(
    n_tables: int,
    strategies: Sequence[str],
    budgets: Sequence[int],
    seeds: Sequence[int],
    early_stopping: Sequence[str] | None = None,
    max_budget: dict[str, int] | None = None,
) -> list[Job]:
    """Every search the protocol runs: each strategy, table and seed at each budget without early
    stopping (one search of the largest budget where budgets are prefixes), and once more at the
    largest budget with MO-ASHA for the strategies in ``early_stopping`` (default: all), for the
    compute it saves. ``max_budget``: a strategy searched only up to this budget (its larger
    budgets are left out of the results). Slow strategies first."""
    top = max(budgets)
    with_es = strategies if early_stopping is None else early_stopping
    limit = max_budget or {}
    jobs = []
    for t in range(n_tables):
        for name in strategies:
            runs = budgets if name in BUDGET_AWARE else [top]
            runs = [b for b in runs if b <= limit.get(name, top)]
            for seed in seeds:
                jobs += [Job(t, name, seed, b, False) for b in runs]
                if name in with_es and top <= limit.get(name, top):
                    jobs.append(Job(t, name, seed, top, True))
    return sorted(jobs, key=lambda j: (j.strategy not in SLOW, SLOW.index(j.strategy) if j.strategy in SLOW else 0,
                                       -j.trials))  # fmt: skip


def run_protocol(
    tables: Sequence[Table],
    strategies: Sequence[str],
    budgets: Sequence[int],
    seeds: Sequence[int],
    *,
    jobs: int = 1,
    early_stopping: Sequence[str] | None = None,
    meta_steps: int = 100_000,
    agents_dir: str | Path | None = None,
    max_budget: dict[str, int] | None = None,
    progress: Any = None,
) -> dict[str, Any]:
    """Replay every strategy on every table (leave-one-table-out for the portfolio) and score it.

    Returns ``{"regret": {table: {budget: {strategy: [per seed]}}}, "steps": ..., "curves": ...,
    "early_stopping": ...}``: normalised-hypervolume regret (``1 - HV / table's best HV``) and
    training steps per seed, the regret after every trial of the largest budget's searches, and
    the same largest-budget searches with MO-ASHA (for the strategies in ``early_stopping``,
    default all).
    """
    budgets = sorted(budgets)
    top = budgets[-1]
    portfolios = [portfolio([u for j, u in enumerate(tables) if j != i], top) if len(tables) > 1 else []
                  for i in range(len(tables))]  # fmt: skip
    if (PORTFOLIO in strategies or META in strategies) and len(tables) < 2:
        raise ValueError("the portfolio and the meta-trained agent learn leave-one-table-out: give at least two tables")
    agents: list[str | None] = [None] * len(tables)
    if META in strategies:
        agents = meta_train_loo(tables, steps=meta_steps, folder=agents_dir, jobs=jobs, progress=progress)
    todo = protocol_jobs(len(tables), strategies, budgets, seeds, early_stopping, max_budget)
    results: list[Replay] = []
    if jobs > 1:
        import functools

        run = functools.partial(_run_job, tables, portfolios, agents)
        with worker_pool(jobs) as pool:
            for i, r in enumerate(pool.map(run, todo, chunksize=1)):
                results.append(r)
                if progress:
                    progress(i + 1, len(todo))
    else:
        for i, job in enumerate(todo):
            results.append(_run_job(tables, portfolios, agents, job))
            if progress:
                progress(i + 1, len(todo))
    out: dict[str, Any] = {"regret": {}, "steps": {}, "curves": {}, "early_stopping": {}, "budgets": budgets,
                           "seeds": list(seeds), "strategies": list(strategies),
                           "tables": {t.name: {"path": str(t.path), "rows": len(t.keys), "best_hv": t.best_hv}
                                      for t in tables}}  # fmt: skip
    for job, r in zip(todo, results, strict=True):
        table = tables[job.table]
        if job.early_stopping:
            es = out["early_stopping"].setdefault(table.name, {}).setdefault(job.strategy, {})
            es.setdefault("regret", []).append(table.regret(r.hypervolume[-1]))
            es.setdefault("steps", []).append(r.steps[-1])
            es.setdefault("pruned", []).append(r.pruned)
            continue
        prefixes = [b for b in budgets if b <= (max_budget or {}).get(job.strategy, top)]
        for b in prefixes if job.strategy not in BUDGET_AWARE else [job.trials]:
            hv, steps = r.at(b)
            out["regret"].setdefault(table.name, {}).setdefault(b, {}).setdefault(job.strategy, []).append(
                table.regret(hv)
            )
            out["steps"].setdefault(table.name, {}).setdefault(b, {}).setdefault(job.strategy, []).append(steps)
        if job.trials == max(prefixes):
            curve = [table.regret(h) for h in r.hypervolume]
            out["curves"].setdefault(table.name, {}).setdefault(job.strategy, []).append(curve)
    out["ranks"] = mean_ranks(out["regret"], budgets, strategies)
    return out


def _meta_train_one(paths: Sequence[str], space: SearchSpace, steps: int, out: str) -> str:
    from attn_search.strategies.agent import meta_train

    meta_train(paths, space, steps=steps, out=out)
    return out


def meta_train_loo(
    tables: Sequence[Table], *, steps: int, folder: str | Path | None = None, jobs: int = 1, progress: Any = None
) -> list[str | None]:
    """One agent per table, meta-trained on every other table (``folder/loo-<table>.zip``; an
    existing file is reused, so a stopped benchmark does not train it again)."""
    folder = Path(folder or tempfile.mkdtemp(prefix="attn-meta-"))
    folder.mkdir(parents=True, exist_ok=True)
    base = tables[0].lookup.space  # the space the tables were loaded with (restricted to their grid)
    todo = {}
    out: list[str | None] = []
    for i, t in enumerate(tables):
        path = folder / f"loo-{t.name}.zip"
        out.append(str(path))
        if not path.is_file():
            todo[i] = ([str(u.path) for j, u in enumerate(tables) if j != i], str(path))
    if jobs > 1 and len(todo) > 1:
        with worker_pool(min(jobs, len(todo))) as pool:
            list(pool.map(_meta_train_one, *zip(*[(paths, base, steps, o) for paths, o in todo.values()], strict=True)))
    else:
        for paths, o in todo.values():
            _meta_train_one(paths, base, steps, o)
    return out


def mean_ranks(
    regret: dict[str, dict[int, dict[str, list[float]]]], budgets: Sequence[int], strategies: Sequence[str]
) -> dict[int, dict[str, float]]:
    """Per budget, each strategy's rank by median regret on each table (1 = best, ties share the
    mean rank), averaged over the tables; among the strategies searched at that budget."""
    out: dict[int, dict[str, float]] = {}
    for b in budgets:
        present = [s for s in strategies if all(s in cells.get(b, {}) for cells in regret.values())]
        per_table = []
        for cells in regret.values():
            medians = [float(np.median(cells[b][s])) for s in present]
            per_table.append(rank_with_ties(medians))
        mean = np.mean(np.asarray(per_table), axis=0)
        out[b] = {s: float(m) for s, m in zip(present, mean, strict=True)}
    return out
