"""Strategies compared on a recorded table, at equal trial budgets.

Every strategy searches the table's grid (each parameter takes the values recorded in the table)
and is scored by the normalised hypervolume of all its proposals (accuracy in [0, 1], compute
between the table's min and max): ``random``, ``tpe``, ``nsga2`` (Optuna samplers over the grid
as categorical parameters), ``ppo`` from scratch (the RL strategy of ``--strategy ppo``), and
``ppo-pretrained``: PPO first trained for ``--pretrain-steps`` on the same table with a different
seed, then searching. Prints median and interquartile range per strategy and budget; the last
line is a JSON object of the medians.

Usage::

    python benchmarks/strategies.py --table tables/sparse-smoke.csv
    python benchmarks/strategies.py --table T.csv --budgets 20 50 --seeds 5
"""

from __future__ import annotations

import argparse
import json
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from attn_search.envs.attention_search import AttentionSearchEnv, TableEvaluator

from attn_search.pareto import normalized_hypervolume
from attn_search.rl import BudgetReached, make_agent, run_agent
from attn_search.space import SearchSpace, load_space
from attn_search.strategies import make_sampler


def optuna_search(
    name: str, env: AttentionSearchEnv, table: TableEvaluator, budget: int, seed: int
) -> list[list[float]]:
    space = env.space
    sampler = make_sampler(name, seed=seed, n_objectives=len(space.metrics), n_trials=budget)
    study = optuna.create_study(directions=space.directions, sampler=sampler)
    points: list[list[float]] = []
    for _ in range(budget):
        trial = study.ask()
        chosen: dict[str, Any] = {}
        for p, grid in zip(space.params, env.grids, strict=True):
            if p.active(chosen):
                chosen[p.name] = trial.suggest_categorical(p.name, grid)
        metrics = table(space.make_config(chosen), chosen)
        assert metrics is not None
        point = [metrics[m] for m in space.metrics]
        points.append(point)
        study.tell(trial, point)
    return points


def rl_search(space: SearchSpace, table_path: str, table: TableEvaluator, budget: int, seed: int,
              agent_path: str | None) -> list[list[float]]:  # fmt: skip
    points: list[list[float]] = []

    def run_trial(values: dict[str, Any]) -> dict[str, float] | None:
        if len(points) >= budget:
            raise BudgetReached
        metrics = table(space.make_config(values), values)
        assert metrics is not None
        points.append([metrics[m] for m in space.metrics])
        return metrics

    # pretrain=None: the agent's bounds and grid come from the table through the evaluator below
    run_agent("ppo", space, run_trial, n_trials=budget, seed=seed, compute="flops", pretrain=table_path,
              pretrain_steps=0, agent_path=agent_path)  # fmt: skip
    return points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", required=True)
    parser.add_argument("--space", default="sparse")
    parser.add_argument("--budgets", type=int, nargs="+", default=[20, 50, 100])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--pretrain-steps", type=int, default=3000)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    space = load_space(args.space).with_compute("flops")
    table = TableEvaluator(args.table, space)
    env = AttentionSearchEnv(space, table, budget=10)
    lower, upper = env.lower, env.upper

    def hv(points: list[list[float]]) -> float:
        return normalized_hypervolume(points, space.directions, lower=lower, upper=upper)

    strategies = ["random", "tpe", "nsga2", "ppo", "ppo-pretrained"]
    results: dict[str, dict[int, list[float]]] = {s: {b: [] for b in args.budgets} for s in strategies}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            # pretrained agent: trained on the table with another seed, saved, then loaded per budget
            pre_env = AttentionSearchEnv(space, table, budget=10)
            agent = make_agent("ppo", pre_env, seed=1000 + seed)
            agent.learn(total_timesteps=args.pretrain_steps)
            agent_path = str(Path(tmp) / f"agent-{seed}.zip")
            agent.save(agent_path)
            for budget in args.budgets:
                for name in ("random", "tpe", "nsga2"):
                    results[name][budget].append(hv(optuna_search(name, env, table, budget, seed)))
                results["ppo"][budget].append(hv(rl_search(space, args.table, table, budget, seed, None)))
                results["ppo-pretrained"][budget].append(
                    hv(rl_search(space, args.table, table, budget, seed, agent_path))
                )
            print(f"seed {seed} done", flush=True)
    best = hv([[r[m] for m in space.metrics] for r in table.rows.values()])
    print(f"\ntable: {len(table.rows)} configurations; hypervolume of the whole table (the optimum) {best:.4f}")
    print(f"{'strategy':<15}" + "".join(f"{'budget ' + str(b):>26}" for b in args.budgets))
    medians: dict[str, dict[str, float]] = {}
    for name in strategies:
        cells = []
        for b in args.budgets:
            v = np.array(results[name][b])
            q1, med, q3 = np.percentile(v, [25, 50, 75])
            medians.setdefault(name, {})[str(b)] = float(med)
            cells.append(f"{med:.4f} [{q1:.4f}, {q3:.4f}]")
        print(f"{name:<15}" + "".join(f"{c:>26}" for c in cells))
    print(json.dumps({"table_optimum": best, "median_hypervolume": medians, "seeds": args.seeds}))


if __name__ == "__main__":
    main()
