"""Strategies compared on a recorded table, at equal trial budgets, through the search loop itself.

Every strategy runs ``run_search`` with ``--evaluator table:TABLE`` (each parameter takes the
values recorded in the table, proposals are looked up instead of trained) and is scored by its
run's normalised hypervolume (the one definition: accuracy in [0, 1], compute scaled by the
table's range): ``random``, ``tpe``, ``nsga2``, ``ppo`` from scratch, and ``ppo-pretrained``
(``--pretrain TABLE``: the agent first trains for ``--pretrain-steps`` env steps on the table).
Prints median and interquartile range per strategy and budget; the last line is a JSON object of
the medians.

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

import numpy as np

from attn_search.outputs import RunOutputs, load_run, trials_frame
from attn_search.search import SearchOptions, run_search


def search_hypervolume(table: str, space: str, strategy: str, budget: int, seed: int, out: Path, *,
                       pretrain_steps: int | None = None) -> float:  # fmt: skip
    opts = SearchOptions(space=space, strategy=strategy, evaluator=f"table:{table}", trials=budget, seed=seed,
                         pruner="none", out=str(out), quiet=True)  # fmt: skip
    if pretrain_steps is not None:
        opts.pretrain, opts.pretrain_steps = table, pretrain_steps
    run_search(opts)
    study, sp, record = load_run(out)
    return RunOutputs.from_record(out, record, sp).hypervolume(trials_frame(study))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", required=True)
    parser.add_argument("--space", default="sparse")
    parser.add_argument("--budgets", type=int, nargs="+", default=[20, 50, 100])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--pretrain-steps", type=int, default=3000)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    strategies = ["random", "tpe", "nsga2", "ppo", "ppo-pretrained"]
    results: dict[str, dict[int, list[float]]] = {s: {b: [] for b in args.budgets} for s in strategies}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            for budget in args.budgets:
                for name in strategies:
                    out = Path(tmp) / f"{name}-{budget}-{seed}"
                    steps = args.pretrain_steps if name == "ppo-pretrained" else None
                    strategy = "ppo" if name == "ppo-pretrained" else name
                    value = search_hypervolume(
                        args.table, args.space, strategy, budget, seed, out, pretrain_steps=steps
                    )
                    results[name][budget].append(value)
            print(f"seed {seed} done", flush=True)
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
    print(json.dumps({"median_hypervolume": medians, "seeds": args.seeds}))


if __name__ == "__main__":
    main()
