"""Is the learned proposer worth choosing on a task family it has never seen?

Leave-one-family-out over the recorded tables (``tables/*.csv``; a family is the task a table was
recorded on, so ``mqar-128`` and ``mqar-64`` are left out together):

* for each held-out family, ``--agents`` candidate policies (``--strategy ppo``) are meta-trained
  with different seeds (from ``--first-agent-seed``, 0: another value scores another set of
  agents) on the tables of every *other* family
  (:func:`attn_search.strategies.candidates.meta_train`), cached in ``--agents-dir`` and reused
  only when their sidecar's provenance matches (tables, steps, seed, code version, sha256); the
  script refuses to score an agent whose sidecar lists a table of the held-out family;
* every strategy replays every table of the held-out family (:func:`attn_search.replay.replay`:
  the strategies' own ask/tell, duplicates answered, no early stopping) at 10, 20 and 50 trials,
  with compute counted at the table's task length and at ``--deploy-len`` (analytic FLOPs, a
  derived copy of the table), seeds paired across strategies;
* baselines: ``random``, ``tpe``, ``gp`` (up to 20 trials: on a table a 50-trial search takes
  5-12 s, 3-7x a 20-trial one), ``portfolio`` (the zero-shot list greedily covering the other
  families' fronts), ``portfolio+gp`` (its first 5 configurations, then GP) and ``acquisition``
  (the same candidate proposer untrained, ``--agent none``: what meta-training adds), on the same
  seeds as ``ppo`` (``--gp-seeds`` fewer for the two GP strategies);
* ``ppo`` is the shipped recipe: the first configurations learned from the other families'
  tables (:func:`attn_search.strategies.head.learn_head`, 5 of them), then the policy
  (``--no-head``: the policy alone); agent ``K + i`` (``K``: ``--first-agent-seed``) runs search
  seeds ``i, i + A, ...`` (``A``: ``--agents``), so its ``--seeds`` searches pair with the
  baselines' by seed and spread over the trained agents;
* score: normalised-hypervolume regret ``1 - HV / the table's best``; per family, length and
  budget the median and IQR over every (table, seed), mean ranks of the medians over families,
  and paired Wilcoxon tests of ``ppo`` against each baseline (over tables x seeds); per agent, its
  median regret (the spread over trained agents) and a sign test over agents against each
  baseline's median.

With ``--sealed [DIR]`` the held-out families are those of ``DIR`` (``tables/sealed/``), recorded to
test the recipe once after its last change and never used to choose anything: every agent, head
and portfolio is learned from all the families of ``tables/`` (the shipped recipe, with ``--agents``
seeds), and the sealed tables are only scored. With several DIRs (``--sealed DIR DIR...``) one set of
agents, learned from ``tables/`` alone, scores the families of them all (a spent set so scored again
tests the current recipe there, though it may have shaped it).

With ``--learn-from DIR...`` the families of each DIR (a sealed set once it has been scored) join
those of ``tables/``: learned from, and held out in turn like them; with ``--sealed`` too, the
sealed set's agents, heads and portfolio learn from both.

Writes ``family_out.json`` (``family_out_tiles.json`` with ``--deploy-compute attn_tile_flops``) to
``--out`` (``benchmarks/results``, or with ``--sealed`` its folder named as the DIRs, joined by ``+``):
every regret, the report, each agent's provenance, the tables each held-out family's proposers
learned from (``learned_from``) and ``ppo``'s heads; prints the tables and its wall time.

Usage::

    python benchmarks/family_out.py                          # every family, 10 agents, 10 seeds
    python benchmarks/family_out.py --families delay ngram --agents 2 --seeds 4 --steps 2048
    python benchmarks/family_out.py --strategies ppo --agents 5 --first-agent-seed 5 --out DIR   # agents 5-9
    python benchmarks/family_out.py --sealed                 # the sealed families, once
    python benchmarks/family_out.py --sealed tables/sealed2  # another set of them
    python benchmarks/family_out.py --sealed tables/sealed*  # every sealed set (out: benchmarks/results/sealed+sealed2+...)
    python benchmarks/family_out.py --learn-from tables/sealed tables/sealed2 tables/sealed3 --out benchmarks/results/fifteen
"""

from __future__ import annotations

import argparse
import functools
import json
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from attn_search.engine import metrics as M
from attn_search.replay import PORTFOLIO, PORTFOLIO_GP, Table, portfolio, replay, worker_pool
from attn_search.search.space import load_space
from attn_search.strategies import head as head_module
from attn_search.strategies.candidates import (
    TableTask,
    code_version,
    family_out_agent,
    proposer_version,
    provenance,
    recorded_task,
)
from attn_search.strategies.head import learn_head

ROOT = Path(__file__).resolve().parent.parent
EXCLUDED = ("sparse-smoke", "majority-64")
"""Tables outside the protocol: ``sparse-smoke`` predates curves (its accuracies span too little);
``majority-64`` correlates 0.85 with ``selective_copy-128`` (Spearman over the grid), so it is not
a family of its own and would let a held-out selective copy be scored after training on its
sibling (``prefix_majority`` replaced it)."""
ACQUISITION = "acquisition"
"""``--strategy ppo --agent none``: the candidate policy untrained (greedy optimistic front gain)."""
BASELINES = ("random", "tpe", "gp", PORTFOLIO, PORTFOLIO_GP, ACQUISITION)
GP_MAX = 20
SEALED = ROOT / "tables" / "sealed"
"""Families recorded to test the recipe once, after its last change: no agent, head, portfolio or
variant was ever trained or chosen on them (``--sealed``; ``tables/README.md``)."""


def deploy_table(path: Path, length: int, folder: Path, metric: str = M.FLOPS) -> Path:
    """A copy of the table whose ``flops`` column holds analytic ``metric`` at ``length`` (the
    deployment length): the whole model's FLOPs, or with ``--deploy-compute attn_tile_flops`` the
    attention's over 128-tiles (the sparse space's own objective)."""
    import pandas as pd

    out = folder / f"{path.stem}@{length}{'' if metric == M.FLOPS else '-' + metric}.csv"
    if out.is_file() and out.stat().st_mtime >= path.stat().st_mtime:
        return out
    task = TableTask(path, deploy_len=length, deploy_metric=metric)
    lines = path.read_text().splitlines(keepends=True)
    header = "".join(line for line in lines if line.startswith("#"))
    frame = pd.read_csv(path, comment="#")
    complete = frame["state"] == "complete"
    frame.loc[complete, M.FLOPS] = task.costs["deploy"]
    folder.mkdir(parents=True, exist_ok=True)
    out.write_text(
        header + f"# flops: analytic {metric} at L={length} (benchmarks/family_out.py)\n" + frame.to_csv(index=False)
    )
    return out


def train_agent(
    paths: Sequence[str], held: str | Sequence[str], seed: int, steps: int, folder: str, deploy_len: int
) -> str:
    return str(family_out_agent(paths, held, seed=seed, steps=steps, folder=folder, deploy_len=deploy_len))


def run_search(job: tuple[str, str, int, int, dict[str, Any], list[dict[str, Any]]]) -> tuple[float, ...]:
    path, strategy, seed, trials, options, configs = job
    warnings.filterwarnings("ignore")
    table = _table(path)
    if strategy == ACQUISITION:  # the same proposer with no meta-training: what training adds
        strategy, options = "ppo", {"agent": "none"}
    r = replay(table, strategy, trials=trials, seed=seed, options=options, portfolio_configs=configs)
    return tuple(table.regret(h) for h in r.hypervolume)


def _job_key(job: tuple[str, str, int, int, dict[str, Any], list[dict[str, Any]]]) -> str:
    import hashlib

    path, strategy, seed, trials, options, configs = job
    agent = options.get("agent")
    agent_hash = hashlib.sha256(Path(agent).read_bytes()).hexdigest()[:16] if agent and agent != "none" else ""
    uses_portfolio = strategy in (PORTFOLIO, PORTFOLIO_GP)
    folio = (
        hashlib.sha256(json.dumps(configs, sort_keys=True, default=str).encode()).hexdigest()[:16]
        if uses_portfolio
        else ""
    )
    if strategy == "ppo":  # its learned head, and the code that proposes it
        head = json.dumps(options.get("head"), sort_keys=True, default=str) + Path(head_module.__file__).read_text()
        folio = hashlib.sha256(head.encode()).hexdigest()[:16]
    table = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
    # the proposer's own code: what its policy is (code_version) and how the strategy queries it
    code = code_version() + proposer_version() if strategy in ("ppo", ACQUISITION) else ""
    return f"{Path(path).name}|{table}|{strategy}|{seed}|{trials}|{agent_hash}|{folio}|{code}|{_replay_version()}"


@functools.lru_cache(maxsize=1)
def _replay_version() -> str:
    """sha256 of the code every replay runs through (the replay loop, the Optuna samplers and their
    adapter, the table evaluator) and Optuna's version: a baseline's cached search is reused only if
    that code is unchanged (a run once reused TPE searches cached by older code, and its TPE figures
    differed from a fresh run's in 3 to 13 of MQAR's 20 searches per cell)."""
    import hashlib

    import optuna

    from attn_search import replay as replay_module
    from attn_search.search import evaluators, loop
    from attn_search.strategies import base, samplers

    text = "".join(Path(m.__file__).read_text() for m in (replay_module, loop, evaluators, base, samplers))  # type: ignore[arg-type]
    return hashlib.sha256((text + optuna.__version__).encode()).hexdigest()[:16]


_TABLES: dict[str, Table] = {}


def _table(path: str) -> Table:
    if path not in _TABLES:
        # the whole model's FLOPs over kept entries, as the recorded results count them (attn_flops
        # differs from it by a constant per table, which the normalised range removes; the sparse
        # space's own attn_tile_flops is flat at a table's length of 64 or 128, one tile)
        _TABLES[path] = Table(path, load_space("sparse").with_compute("flops"))
    return _TABLES[path]


def correlations(paths: Sequence[Path]) -> dict[str, dict[str, float]]:
    """Spearman correlation of accuracy between every pair of tables, over the configurations both
    hold (the grid is the same): tables of different families should correlate below 0.8."""
    import pandas as pd

    from attn_search.report.outputs import row_config

    acc = {}
    for p in paths:
        frame = pd.read_csv(p, comment="#")
        frame = frame[frame["state"] == "complete"]
        keys = [json.dumps(row_config(r).to_dict(), sort_keys=True) for _, r in frame.iterrows()]
        acc[p.stem] = pd.Series(frame[M.ACCURACY].to_numpy(float), index=keys)
    matrix = pd.DataFrame(acc).corr(method="spearman")
    return {a: {b: round(float(matrix.loc[a, b]), 3) for b in matrix.columns} for a in matrix.index}


def print_correlations(corr: dict[str, dict[str, float]], family: dict[str, str]) -> None:
    names = list(corr)
    print("Spearman correlation of accuracy between tables:")
    print(" " * 20 + " ".join(f"{n[:9]:>9}" for n in names))
    for a in names:
        print(f"{a:<20}" + " ".join(f"{corr[a][b]:>9.2f}" for b in names))
    cross = [corr[a][b] for i, a in enumerate(names) for b in names[i + 1 :] if family[a] != family[b]]
    print(f"across families: max {max(cross):.2f}, median {float(np.median(cross)):.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", help="held-out families to score (default: every one)")
    parser.add_argument("--agents", type=int, default=10,
                        help="meta-training seeds per held-out family (with --seeds 10, each search its own agent; "
                        "five agents left the results depending on which five were trained)")  # fmt: skip
    parser.add_argument("--first-agent-seed", type=int, default=0,
                        help="meta-training seeds are this one and the next --agents - 1 (another set of agents: how "
                        "much the results depend on which agents were trained)")  # fmt: skip
    parser.add_argument("--seeds", type=int, default=10, help="searches per table and strategy")
    parser.add_argument("--gp-seeds", type=int,
                        help="searches per table of gp and portfolio+gp (default: --seeds; fewer pair ppo with them on "
                        "fewer seeds, and with 5 no two-sided paired test can reach p < 0.05)")  # fmt: skip
    parser.add_argument("--steps", type=int, default=4096, help="meta-training environment steps per agent")
    parser.add_argument("--budgets", type=int, nargs="+", default=[10, 20, 50])
    parser.add_argument("--deploy-len", type=int, default=4096)
    parser.add_argument("--deploy-compute", default=M.FLOPS, choices=(M.FLOPS, M.ATTN_TILE_FLOPS),
                        help="compute at --deploy-len: the whole model's FLOPs over kept entries (default, as agents are "
                        "meta-trained), or the attention's over 128-tiles (the sparse space's own objective)")  # fmt: skip
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--strategies", nargs="+", default=["random", "tpe", "gp", PORTFOLIO, PORTFOLIO_GP, "ppo"],
                        help=f"default: every baseline but {ACQUISITION} (the untrained ablation), and ppo")  # fmt: skip
    parser.add_argument(
        "--no-head", action="store_true", help="score ppo without its learned first configurations (the policy alone)"
    )
    parser.add_argument("--head-size", type=int, default=head_module.HEAD_SIZE,
                        help="ppo's learned first configurations (default: the shipped recipe's)")  # fmt: skip
    parser.add_argument("--sealed", nargs="*", metavar="DIR",
                        help=f"score the sealed families of each DIR (default {SEALED.relative_to(ROOT)}/) instead: "
                        "every agent, head and portfolio learned from all the families of tables/, as the shipped "
                        "recipe is; with several DIRs one set of agents scores them all")  # fmt: skip
    parser.add_argument("--learn-from", nargs="+", default=[], metavar="DIR",
                        help="folders of tables whose families join tables/'s: learned from, and held out in turn "
                        "(a spent sealed set, once scored, so that a recipe trained on more families can be judged)")  # fmt: skip
    parser.add_argument("--agents-dir", default=str(ROOT / "benchmarks" / "results" / "agents"))
    parser.add_argument("--out", help="folder of family_out.json, or family_out_tiles.json with tiles (default: "
                        "benchmarks/results, or its folder named as the --sealed DIRs, joined by +)")  # fmt: skip
    args = parser.parse_args()
    args.gp_seeds = args.seeds if args.gp_seeds is None else args.gp_seeds
    if args.sealed == []:  # --sealed alone
        args.sealed = [str(SEALED)]
    sealed_dirs = list(dict.fromkeys(Path(d).resolve() for d in args.sealed or []))
    args.out = args.out or str(ROOT / "benchmarks" / "results" / "+".join(d.name for d in sealed_dirs))
    start = time.perf_counter()
    learnable = sorted(p for p in (ROOT / "tables").glob("*.csv") if p.stem not in EXCLUDED)  # what is learned from
    for folder in dict.fromkeys(Path(f).resolve() for f in args.learn_from):  # (a folder named twice counts once)
        more = sorted(p for p in folder.glob("*.csv") if p.stem not in EXCLUDED)
        if not more:
            parser.error(f"--learn-from: no table in {folder}")
        if folder == (ROOT / "tables").resolve():
            parser.error("--learn-from tables/: its tables are learned from already")
        if folder in sealed_dirs:
            parser.error(f"--learn-from {folder} is the --sealed set: a sealed family must be one nothing learns from")
        twice = sorted({p.stem for p in more} & {p.stem for p in learnable})
        if twice:  # the leak check and the pairing go by table name
            parser.error(f"--learn-from {folder}: {twice} already learned from under the same name")
        learnable += more
    sealed: list[Path] = []
    for given in args.sealed or []:
        folder = Path(given).resolve()
        if folder in {p.parent for p in sealed}:  # (a folder named twice, in any spelling, counts once)
            continue
        more = sorted(folder.glob("*.csv"))
        if not more:
            parser.error(f"--sealed: no table in {given}")
        same = sorted({p.stem for p in more} & {p.stem for p in sealed})
        if same:  # the leak check and the pairing go by table name
            parser.error(f"--sealed: {same} in {given} and in another --sealed folder")
        sealed += more
    paths = learnable + sealed
    family = {str(p): recorded_task(p)[0] for p in paths}
    families = sorted(set(family.values()))
    scorable = sorted({family[str(p)] for p in (sealed or learnable)})
    sealed_families = tuple(sorted({family[str(p)] for p in sealed}))
    clash = set(sealed_families) & {family[str(p)] for p in learnable}  # a sealed family must be new,
    clash |= {p.stem for p in sealed} & {p.stem for p in learnable}  # and its tables' names too
    if clash:
        parser.error(f"--sealed: {sorted(clash)} also in tables/: a sealed family must be one nothing learns from")
    if set(args.families or []) - set(scorable):
        parser.error(f"--families: {sorted(set(args.families) - set(scorable))} is not among {scorable}")
    held = args.families or scorable

    def learned_from(f: str) -> list[Path]:  # the tables a proposer scored on family f may learn from
        return [p for p in learnable if family[str(p)] != f]

    def agent_key(f: str) -> str | tuple[str, ...]:  # the sealed families share their agents (all trained alike)
        return sealed_families if args.sealed else f

    corr = correlations(paths)
    print_correlations(corr, {p.stem: family[str(p)] for p in paths})
    work = Path(args.agents_dir) / "tables"  # derived tables and the cache live beside the agents (git-ignored)
    by_length = {"task": {str(p): str(p) for p in paths},
                 "deploy": {str(p): str(deploy_table(p, args.deploy_len, work, args.deploy_compute)) for p in paths}}  # fmt: skip
    agents_dir = Path(args.agents_dir)
    agents_dir.mkdir(parents=True, exist_ok=True)
    pool = worker_pool(args.jobs)

    # -- agents: meta-trained on the other families' tables (family_out_agent checks provenance
    # and refuses one that saw the held-out family); the env counts compute at both lengths
    train: dict[tuple[str | tuple[str, ...], int], Path] = {}

    def agent_seed(search_seed: int) -> int:  # the meta-training seed of the agent a ppo search uses
        return args.first_agent_seed + search_seed % args.agents

    if "ppo" in args.strategies:
        todo = list(
            dict.fromkeys((agent_key(f), s) for f in held for s in sorted({agent_seed(i) for i in range(args.agents)}))
        )
        print(f"meta-training (or reusing) {len(todo)} agents ({args.steps} steps each) ...", flush=True)
        made = pool.map(train_agent, *zip(*[([str(p) for p in paths], f, s, args.steps, str(agents_dir),
                                              args.deploy_len) for f, s in todo], strict=True))  # fmt: skip
        train = {key: Path(p) for key, p in zip(todo, made, strict=True)}

    # -- the shipped recipe's first configurations (attn_search.strategies.head), learned like the
    # shipped policy's but from the other families' tables only
    heads: dict[tuple[str, str], list[dict[str, Any]]] = {}
    if "ppo" in args.strategies:
        tasks = {str(p): TableTask(p, deploy_len=args.deploy_len, deploy_metric=args.deploy_compute) for p in learnable}
        learned: dict[tuple[tuple[Path, ...], str], list[dict[str, Any]]] = {}  # (the sealed families share one)
        for f in held:
            for n in by_length:
                key = (tuple(learned_from(f)), n)
                if key not in learned:
                    learned[key] = learn_head([tasks[str(p)] for p in key[0]], args.head_size, (n,))
                heads[f, n] = learned[key]
        if args.no_head:
            heads = {k: [] for k in heads}

    # -- searches
    jobs, keys = [], []
    top = max(args.budgets)
    folios: dict[
        tuple[str, ...], list[dict[str, Any]]
    ] = {}  # by the tables learned from (the sealed families share one)
    for f in held:
        for length, files in by_length.items():
            others = tuple(files[str(p)] for p in learned_from(f))
            if others not in folios:
                folios[others] = (
                    portfolio([_table(t) for t in others], top)
                    if {PORTFOLIO, PORTFOLIO_GP} & set(args.strategies)
                    else []
                )
            configs = folios[others]
            for p in (q for q in map(str, paths) if family[q] == f):
                for strategy in args.strategies:
                    for seed in range(args.gp_seeds if strategy in ("gp", PORTFOLIO_GP) else args.seeds):
                        budgets = [top] if strategy in ("random", PORTFOLIO) else args.budgets
                        for b in budgets:
                            if strategy in ("gp", PORTFOLIO_GP) and b > GP_MAX:
                                continue
                            options = {}
                            if strategy == "ppo":
                                options = {
                                    "agent": str(train[agent_key(f), agent_seed(seed)]),
                                    "head": heads[f, length] or "none",
                                }
                            jobs.append((files[p], strategy, seed, b, options, configs))
                            keys.append((f, length, Path(p).stem, strategy, seed, b))
    # a finished search is cached by what determines it (table file, strategy, seed, trials, agent
    # file hash, portfolio or head, for ppo the proposer's code: code_version + proposer_version, and
    # for every strategy the replay's code), so a stopped benchmark resumes and a new table reruns
    # nothing else
    cache_path = Path(args.agents_dir) / "family_out_cache.jsonl"
    cache = {}
    if cache_path.is_file():
        for line in cache_path.read_text().splitlines():
            entry = json.loads(line)
            cache[entry["key"]] = entry["curve"]
    job_keys = [_job_key(j) for j in jobs]
    todo = [j for j, k in zip(jobs, job_keys, strict=True) if k not in cache]
    print(f"{len(jobs)} searches ({len(jobs) - len(todo)} cached) on {args.jobs} processes ...", flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    with cache_path.open("a") as fh:
        for job, curve in zip(todo, pool.map(run_search, todo, chunksize=2), strict=True):
            cache[_job_key(job)] = list(curve)
            fh.write(json.dumps({"key": _job_key(job), "curve": list(curve)}) + "\n")
            fh.flush()
    pool.shutdown()
    curves = [cache[k] for k in job_keys]

    regret: dict[str, dict[str, dict[int, dict[str, list[float]]]]] = {}
    per_agent: dict[str, dict[str, dict[int, dict[int, list[float]]]]] = {}
    for (f, length, table, strategy, seed, b), curve in zip(keys, curves, strict=True):
        for budget in args.budgets:
            if budget > b or (b != budget and strategy not in ("random", PORTFOLIO)):
                continue
            value = curve[min(budget, len(curve)) - 1]
            cell = regret.setdefault(f, {}).setdefault(length, {}).setdefault(budget, {})
            cell.setdefault(strategy, {})[f"{table}#{seed}"] = value  # paired across strategies by table and seed
            if strategy == "ppo":
                per_agent.setdefault(f, {}).setdefault(length, {}).setdefault(budget, {}).setdefault(
                    agent_seed(seed), []).append(value)  # fmt: skip
    report = summarise_family_out(regret, per_agent, args.budgets)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"regret": regret, "per_agent": per_agent, "report": report, "budgets": args.budgets,
              "families": {f: sorted(Path(p).stem for p in map(str, paths) if family[p] == f) for f in families},
              "agents": {f"{'+'.join(f) if isinstance(f, tuple) else f}/{s}": {**(provenance(p) or {}), "file": p.name}
                         for (f, s), p in train.items()
                         if "ppo" in args.strategies},
              # what each held-out family's agents, head and portfolio were learned from, and ppo's heads
              # (memoised by that set of tables: tests/test_benchmarks.py checks them against heads learned afresh)
              "learned_from": {f: sorted(p.stem for p in learned_from(f)) for f in held
                               if {"ppo", PORTFOLIO, PORTFOLIO_GP} & set(args.strategies)},
              "heads": {f: {n: heads[f, n] for n in by_length} for f in held if (f, "task") in heads},
              "correlations": corr, "args": vars(args), "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip
    written = out / ("family_out_tiles.json" if args.deploy_compute == M.ATTN_TILE_FLOPS else "family_out.json")
    written.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print_report(report, args.budgets)
    print(f"wall time {time.perf_counter() - start:.0f} s; wrote {written}")


def summarise_family_out(regret: dict, per_agent: dict, budgets: Sequence[int]) -> dict[str, Any]:
    from scipy.stats import binomtest, wilcoxon

    report: dict[str, Any] = {"cells": {}, "ranks": {}, "tests": {}, "agents": {}}
    for f, lengths in regret.items():
        for length, cells in lengths.items():
            for b, by in cells.items():
                key = f"{f}/{length}/{b}"
                report["cells"][key] = {s: {"median": float(np.median(list(v.values()))),
                                            "q1": float(np.percentile(list(v.values()), 25)),
                                            "q3": float(np.percentile(list(v.values()), 75)), "n": len(v)}
                                        for s, v in by.items()}  # fmt: skip
                if "ppo" not in by:
                    continue
                tests = {}
                for s, v in by.items():
                    a, b2 = _paired(by["ppo"], v)
                    if s == "ppo" or len(a) < 2:
                        continue
                    p = 1.0 if np.allclose(a, b2) else float(wilcoxon(a, b2).pvalue)
                    tests[s] = {"mean_diff": float((a - b2).mean()), "p": p, "n": len(a)}
                report["tests"][key] = tests
                agents = per_agent.get(f, {}).get(length, {}).get(b, {})
                medians = {a: float(np.median(v)) for a, v in agents.items()}
                signs = {}
                for s, v in by.items():
                    if s == "ppo":
                        continue
                    base = float(np.median(list(v.values())))
                    wins = sum(m < base for m in medians.values())
                    losses = sum(m > base for m in medians.values())
                    signs[s] = {"agents_better": wins, "agents_worse": losses,
                                "p": float(binomtest(wins, wins + losses).pvalue) if wins + losses else 1.0}  # fmt: skip
                report["agents"][key] = {"medians": medians, "sign_tests": signs}
    report["beaten"] = beaten(regret)
    for length in ("task", "deploy"):
        for b in budgets:
            rows = [report["cells"][k] for k in report["cells"] if k.split("/")[1:] == [length, str(b)]]
            names = sorted(set.intersection(*(set(r) for r in rows))) if rows else []
            if not names:
                continue
            ranks = []
            for r in rows:
                med = np.array([r[s]["median"] for s in names])
                ranks.append([float((med < m).sum() + ((med == m).sum() + 1) / 2) for m in med])
            report["ranks"][f"{length}/{b}"] = dict(zip(names, np.mean(ranks, axis=0).round(2).tolist(), strict=True))
    return report


def _paired(x: dict[str, float], y: dict[str, float]) -> tuple[np.ndarray, np.ndarray]:
    """Two strategies' regrets on the searches (``table#seed``) both ran, in the same order."""
    keys = sorted(set(x) & set(y))
    return np.array([x[k] for k in keys]), np.array([y[k] for k in keys])


def beaten(regret: dict, alpha: float = 0.05) -> dict[str, dict[str, list[str]]]:
    """For every strategy, the ``family/length/budget`` cells where another strategy's regrets are
    significantly lower (paired Wilcoxon over the tables and seeds both ran, p < ``alpha``), and
    which: the issue's test of ``ppo`` applied to every strategy alike, so a reader sees how often
    the others lose too (with 5 pairs no two-sided test reaches p < 0.05, so all run the same seeds)."""
    from scipy.stats import wilcoxon

    out: dict[str, dict[str, list[str]]] = {}
    for f, lengths in regret.items():
        for length, cells in lengths.items():
            for b, by in cells.items():
                for s, mine in by.items():
                    winners = []
                    for o, theirs in by.items():
                        a, c = _paired(mine, theirs)
                        if o == s or len(a) < 2:
                            continue
                        # two-sided at alpha, the direction from the signed ranks (not the mean)
                        if not np.allclose(a, c) and wilcoxon(a, c, alternative="greater").pvalue < alpha / 2:
                            winners.append(o)
                    out.setdefault(s, {})
                    if winners:
                        out[s][f"{f}/{length}/{b}"] = sorted(winners)
    return out


def print_report(report: dict[str, Any], budgets: Sequence[int]) -> None:
    for key, cells in sorted(report["cells"].items()):
        tests = report["tests"].get(key, {})
        line = "  ".join(
            f"{s} {c['median']:.3f} [{c['q1']:.3f},{c['q3']:.3f}]" + (f" p={tests[s]['p']:.3g}" if s in tests else "")
            for s, c in sorted(cells.items())
        )
        print(f"{key:<28} {line}")
        agents = report["agents"].get(key)
        if agents:
            print(f"{'':<28} ppo per agent: " + " ".join(f"{m:.3f}" for m in agents["medians"].values()))
    print_ranks(report)
    print_beaten(report, budgets)


def print_ranks(report: dict[str, Any]) -> None:
    for key, ranks in report["ranks"].items():
        print(f"mean rank {key}: " + ", ".join(f"{s} {r}" for s, r in sorted(ranks.items(), key=lambda x: x[1])))


def print_beaten(report: dict[str, Any], budgets: Sequence[int]) -> None:
    """The report's last line: per strategy and budget, the (family, length) cells where another
    strategy is significantly better (:func:`beaten`)."""
    ran = {s: {k.split("/")[2] for k, c in report["cells"].items() if s in c} for s in report.get("beaten", {})}
    counts = {s: [sum(k.split("/")[2] == str(b) for k in cells) if str(b) in ran[s] else None for b in budgets]
              for s, cells in report.get("beaten", {}).items()}  # fmt: skip

    def at_most_20(c: list[int | None]) -> int:  # (the budgets first)
        return sum(n or 0 for b, n in zip(budgets, c, strict=True) if b <= 20)

    print("cells (family x length) where another strategy is significantly better (p < 0.05), at "
          + " / ".join(map(str, budgets)) + " trials: " + ", ".join(
              f"{s} " + " / ".join("-" if n is None else str(n) for n in c)
              for s, c in sorted(counts.items(), key=lambda x: at_most_20(x[1]))))  # fmt: skip


if __name__ == "__main__":
    main()
