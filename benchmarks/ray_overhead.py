"""What Ray Tune costs and gains: the same search on the local backend and on Ray.

Runs one search of ``--trials`` trials twice: on the local backend (one trial at a time, torch on
every core) and on ``--backend ray`` with ``--concurrent`` trials at once (one CPU each). Both use
the random sampler with the same seed and no early stopping, so both train the same
configurations. Prints, per backend, the wall time, the time inside trials (training, evaluation,
measurement), the mean trial time, and the per-trial overhead:
``(wall - inside / concurrent) / trials``, i.e. the wall time not explained by the trials running
``concurrent`` at a time (Ray start, scheduling, result plumbing, outputs). Last line: a JSON object.

Usage::

    python benchmarks/ray_overhead.py                      # 8 trials of ~10 s each, 2 concurrent
    python benchmarks/ray_overhead.py --trials 4 --steps 20

Starts Ray, so it re-executes itself in a loopback-only network namespace (see ``_loopback.py``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _loopback import ensure_loopback_namespace

from attn_search.search.loop import SearchOptions, run_search


def run(backend: str, args: argparse.Namespace, out: Path) -> dict[str, float]:
    extra = {"max_concurrent": args.concurrent, "cpus_per_trial": 1.0} if backend == "ray" else {}
    opts = SearchOptions(space=args.space, strategy="random", backend=backend, trials=args.trials, steps=args.steps,
                         seed=args.seed, pruner="none", out=str(out), quiet=True, device="cpu", population=1, confirm=0,
                         **extra)  # fmt: skip
    start = time.perf_counter()
    summary = run_search(opts)
    wall = time.perf_counter() - start
    df = pd.read_csv(out / "trials.csv")
    concurrent = args.concurrent if backend == "ray" else 1
    return {
        "wall_s": wall,
        "inside_trials_s": summary.trial_seconds,
        "mean_trial_s": float(df["wall_seconds"].mean()),
        "overhead_per_trial_s": (wall - summary.trial_seconds / concurrent) / args.trials,
        "complete": int((df["state"] == "complete").sum()),
        "concurrent": concurrent,
    }


def main() -> None:
    ensure_loopback_namespace()
    warnings.filterwarnings("ignore", module="optuna")  # importance notes in the report
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--space", default="sparse")
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--steps", type=int, default=60, help="training steps per trial (~10 s on one CPU core)")
    parser.add_argument("--concurrent", type=int, default=2, help="Ray trials at once (one CPU each)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for backend in ("local", "ray"):
            results[backend] = run(backend, args, Path(tmp) / backend)
    print(
        f"{'backend':<7} {'concurrent':>10} {'wall s':>8} {'in trials s':>11} {'mean trial s':>12} {'overhead/trial s':>16}"
    )
    for name, r in results.items():
        print(f"{name:<7} {r['concurrent']:>10} {r['wall_s']:>8.1f} {r['inside_trials_s']:>11.1f} "
              f"{r['mean_trial_s']:>12.1f} {r['overhead_per_trial_s']:>16.2f}")  # fmt: skip
    speedup = results["local"]["wall_s"] / results["ray"]["wall_s"]
    print(f"speedup of Ray ({args.concurrent} concurrent) over local: {speedup:.2f}x")
    print(json.dumps({"trials": args.trials, "steps": args.steps, **{f"{b}_{k}": v for b, r in results.items()
                      for k, v in r.items()}, "speedup": speedup}))  # fmt: skip


if __name__ == "__main__":
    main()
