"""Is the shipped agent worth choosing on real training, on a task no table was recorded on?

Runs ``python run_search.py --space sparse`` with each strategy (default: ``ppo``, which loads the
shipped meta-trained agent, against ``tpe``) on a task none of the shipped tables holds (default:
MQAR at length 96 with 12 pairs; the tables have 64/8 and 128/16), at the tables' fidelity (the
default preset's model, 120 steps, no early stopping, no time budget), for several seeds. Every
search really trains its trials. Scores each run's final front with one hypervolume for all runs:
accuracy in [0, 1], FLOPs normalised between the fewest and most FLOPs of the sparse space at the
task's length, reference at the worst corner. Prints per-seed hypervolumes, medians and the
paired wins, and writes ``agent_real.json`` to ``--out``.

Runs are resumable (each a run dir under ``--out``; a finished one is read, not run again), and
``--jobs 2`` runs two searches at once with one thread each. On 2 CPU cores a 20-trial search
takes about 3-4 minutes of one core, so the default 2 strategies x 3 seeds is about 12 minutes.

Usage::

    python benchmarks/agent_real.py
    python benchmarks/agent_real.py --task selective_copy --task-param seq_len=64 --seeds 5
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from attn_search.engine import metrics as M
from attn_search.report.outputs import hypervolume_of_points
from attn_search.search.evaluators import TrainingEvaluator, grids_of
from attn_search.search.space import load_space

ROOT = Path(__file__).resolve().parent.parent


def search(strategy: str, seed: int, args: argparse.Namespace, out: Path, threads: int) -> float:
    """One search (resumed if its run dir holds an unfinished one); its wall seconds."""
    cmd = [sys.executable, str(ROOT / "run_search.py"), "--space", "sparse", "--strategy", strategy,
           "--seed", str(seed), "--trials", str(args.trials), "--preset", "default", "--steps", str(args.steps),
           "--pruner", "none", "--time-budget", "1e9", "--confirm", "0", "--device", "cpu", "--task", args.task,
           "--compute", "flops",  # its recorded figures count the whole model's FLOPs
           "--out", str(out),
           "--quiet"]  # fmt: skip
    for kv in args.task_param:
        cmd += ["--task-param", kv]
    if (out / "run.json").is_file():
        cmd.append("--resume")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategies", nargs="+", default=["ppo-grid", "tpe"])
    parser.add_argument("--task", default="mqar")
    parser.add_argument("--task-param", action="append", default=None, metavar="KEY=VALUE",
                        help="default: seq_len=96 n_pairs=12")  # fmt: skip
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--steps", type=int, default=120, help="training steps per trial (the tables' 120)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "agent_real"))
    args = parser.parse_args(argv)
    if args.task_param is None:
        args.task_param = ["seq_len=96", "n_pairs=12"] if args.task == "mqar" else []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = [(s, seed, out / f"{s}-seed{seed}") for seed in range(args.seeds) for s in args.strategies]
    todo = [r for r in runs if not _finished(r[2], args.trials)]
    print(f"{len(runs)} searches ({len(runs) - len(todo)} already done), {args.jobs} at a time", flush=True)
    threads = 1 if args.jobs > 1 else (os.cpu_count() or 1)
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        futures = {pool.submit(search, s, seed, args, path, threads): (s, seed) for s, seed, path in todo}
        for f in concurrent.futures.as_completed(futures):
            s, seed = futures[f]
            print(f"  {s} seed {seed}: {f.result():.0f} s ({time.perf_counter() - start:.0f} s in all)", flush=True)
    space = load_space("sparse").with_compute("flops")
    task_kwargs = dict(kv.split("=", 1) for kv in args.task_param)
    kwargs = {k: int(v) if v.lstrip("-").isdigit() else v for k, v in task_kwargs.items()}
    evaluator = TrainingEvaluator(space, task=args.task, task_kwargs=kwargs)
    bounds = {M.FLOPS: evaluator.bounds(space, M.FLOPS, grids_of(space, 5))}
    hv: dict[str, list[float]] = {s: [] for s in args.strategies}
    best: dict[str, list[float]] = {s: [] for s in args.strategies}
    for s, _, path in runs:
        df = pd.read_csv(path / "trials.csv")
        done = df[df["state"] == M.COMPLETE]
        hv[s].append(hypervolume_of_points(done[space.metrics].to_numpy(), space, bounds))
        best[s].append(float(done[M.ACCURACY].max()))
    print(f"\n{args.task} {task_kwargs}: final normalised hypervolume of {args.trials}-trial searches "
          f"(FLOPs between {bounds[M.FLOPS][0]:.3g} and {bounds[M.FLOPS][1]:.3g})")  # fmt: skip
    for s in args.strategies:
        print(f"  {s:<6} " + "  ".join(f"{h:.4f}" for h in hv[s]) + f"   median {np.median(hv[s]):.4f}"
              f"   best accuracy median {np.median(best[s]):.3f}")  # fmt: skip
    a, b = args.strategies[:2] if len(args.strategies) > 1 else (args.strategies[0], args.strategies[0])
    wins = sum(x > y for x, y in zip(hv[a], hv[b], strict=True))
    print(f"  {a} beats {b} on {wins} of {len(hv[a])} seeds")
    result = {"task": args.task, "task_params": task_kwargs, "trials": args.trials, "steps": args.steps,
              "hypervolume": hv, "best_accuracy": best, "flops_bounds": bounds[M.FLOPS],
              "command": " ".join(["python", "benchmarks/agent_real.py", *(argv if argv is not None else sys.argv[1:])])}  # fmt: skip
    (out / "agent_real.json").write_text(json.dumps(result, indent=1))
    return 0


def _finished(path: Path, trials: int) -> bool:
    csv = path / "trials.csv"
    if not csv.is_file():
        return False
    df = pd.read_csv(csv)
    return int(df["state"].isin([M.COMPLETE, M.PRUNED, M.FAILED]).sum()) >= trials


if __name__ == "__main__":
    sys.exit(main())
