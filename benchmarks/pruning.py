"""MO-ASHA against no early stopping at an equal wall-time budget.

For each seed, runs the same search (space, strategy, seed) twice with the same ``--time-budget``:
once with ``--pruner moasha`` and once with ``--pruner none``, and compares the normalised
hypervolume of the resulting fronts (the run's one definition: compute scaled by the space's
analytic FLOP range, the same for both runs, so the numbers are comparable). Prints one row per run and, as
the last line, a JSON object with the median hypervolume of each pruner.

Usage::

    python benchmarks/pruning.py                                  # 3 seeds x 2 x 150 s on 2 cores
    python benchmarks/pruning.py --time-budget 60 --seeds 0 1 2   # quicker, noisier
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from attn_search.engine import metrics as M
from attn_search.report.outputs import RunOutputs, front_rows, load_run, trials_frame
from attn_search.search.loop import SearchOptions, run_search


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--space", default="sparse")
    parser.add_argument("--strategy", default="tpe")
    parser.add_argument("--time-budget", type=float, default=150.0, help="seconds per search")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--preset", default="default", help="per-trial budget")
    args = parser.parse_args()
    hv: dict[str, list[float]] = {"moasha": [], "none": []}
    print(f"{'seed':>4} {'pruner':<7} {'trials':>6} {'complete':>8} {'pruned':>6} {'front':>5} {'hypervolume':>11}")
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for pruner in ("moasha", "none"):
                out = Path(tmp) / f"{pruner}-{seed}"
                opts = SearchOptions(
                    space=args.space, strategy=args.strategy, seed=seed, pruner=pruner, preset=args.preset,
                    trials=10_000, time_budget=args.time_budget, out=str(out), quiet=True, population=1, confirm=0,
                )  # fmt: skip
                run_search(opts)
                study, space, record = load_run(out)
                df = trials_frame(study)
                value = RunOutputs.from_record(out, record, space).hypervolume(df)
                hv[pruner].append(value)
                print(
                    f"{seed:>4} {pruner:<7} {len(df):>6} {(df['state'] == M.COMPLETE).sum():>8} "
                    f"{(df['state'] == M.PRUNED).sum():>6} {len(front_rows(df, space)):>5} {value:>11.4f}",
                    flush=True,
                )
    result = {
        "time_budget_s": args.time_budget,
        "seeds": args.seeds,
        "median_hypervolume": {k: statistics.median(v) for k, v in hv.items()},
        "hypervolume": hv,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
