"""Packing trials on a GPU: trials per hour at 1, 2 and 4 trials per GPU (fractional GPUs).

Runs ``--trials`` trials of the default configuration (the space's fixed values and the defaults
of :class:`~attn_search.AttentionConfig`, on the space's task) through ``--backend ray`` with
``--gpus-per-trial 1/k`` for each packing ``k``, and reports trials per hour, the mean trial time
and the peak memory per trial (``peak_mem_mb``: CUDA allocator peak of the trial's process plus
optimiser state). Every trial trains the same configuration, so the packings differ only in how
many share a device. Last line: a JSON object.

Without a GPU (or with ``--device cpu``) it measures the CPU path: ``k`` trials share the
machine's cores, each with ``cores / k`` CPUs and no GPU, so the script stays runnable (and
tested) everywhere.

Usage::

    python benchmarks/gpu_packing.py                         # on a GPU machine
    python benchmarks/gpu_packing.py --trials 8 --packings 1 2 4 --steps 300

Starts Ray, so it re-executes itself in a loopback-only network namespace (see ``_loopback.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pandas as pd
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _loopback import ensure_loopback_namespace

from attn_search.engine.config import AttentionConfig
from attn_search.search.loop import SearchOptions, run_search
from attn_search.search.space import load_space


def one_point_space(name: str, path: Path) -> Path:
    """The space's fixed values and task, with one searched parameter pinned to its default."""
    space = load_space(name)
    pattern = AttentionConfig().pattern
    doc = {
        "name": f"{space.name}-default",
        "task": {"name": space.task, "params": dict(space.task_params)},
        "objectives": {"accuracy": "maximize", "flops": "minimize"},
        "fixed": dict(space.fixed),
        "params": {"pattern": {"type": "categorical", "choices": [pattern]}},
    }
    path.write_text(yaml.safe_dump(doc))
    return path


def main() -> None:
    ensure_loopback_namespace()
    warnings.filterwarnings("ignore", module="optuna")  # importance notes in the report
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--space", default="sparse", help="whose fixed values and task define the config")
    parser.add_argument("--trials", type=int, default=8, help="trials per packing")
    parser.add_argument("--packings", type=int, nargs="+", default=[1, 2, 4], help="trials per GPU")
    parser.add_argument("--steps", type=int, default=None, help="training steps per trial (default: the preset's)")
    parser.add_argument("--preset", default="default")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    args = parser.parse_args()

    import torch

    gpus = torch.cuda.device_count() if args.device != "cpu" else 0
    cores = os.cpu_count() or 1
    where = f"{gpus} x {torch.cuda.get_device_name(0)}" if gpus else f"CPU only ({cores} cores)"
    print(f"device: {where}")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        space = one_point_space(args.space, Path(tmp) / "space.yaml")
        for k in args.packings:
            if gpus:
                resources = {"gpus_per_trial": 1.0 / k, "cpus_per_trial": max(1.0, (cores - 1) // (k * gpus))}
                concurrent = k * gpus
            else:
                resources = {"gpus_per_trial": 0.0, "cpus_per_trial": max(1.0, cores / k)}
                concurrent = min(k, cores)
            out = Path(tmp) / f"pack{k}"
            opts = SearchOptions(space=str(space), strategy="random", backend="ray", trials=args.trials,
                                 preset=args.preset, steps=args.steps, pruner="none", out=str(out), quiet=True, population=1, confirm=0,
                                 device="cuda" if gpus else "cpu", max_concurrent=concurrent, **resources)  # fmt: skip
            start = time.perf_counter()
            run_search(opts)
            wall = time.perf_counter() - start
            df = pd.read_csv(out / "trials.csv")
            ok = df[df["state"] == "complete"]
            results.append({
                "per_device": k, "concurrent": concurrent, "wall_s": wall, "complete": len(ok),
                "trials_per_hour": 3600.0 * len(ok) / wall, "mean_trial_s": float(ok["wall_seconds"].mean()),
                "peak_mem_mb": float(ok["peak_mem_mb"].max()), "accuracy": float(ok["accuracy"].mean()),
                "device": str(ok["device"].iloc[0]) if len(ok) else "",
            })  # fmt: skip
    base = results[0]["trials_per_hour"]
    print(f"{'per GPU' if gpus else 'per host':>8} {'concurrent':>10} {'trials/h':>9} {'vs 1':>6} {'mean trial s':>12} "
          f"{'peak MB/trial':>13} {'accuracy':>8}")  # fmt: skip
    for r in results:
        print(f"{r['per_device']:>8} {r['concurrent']:>10} {r['trials_per_hour']:>9.0f} {r['trials_per_hour'] / base:>5.2f}x "
              f"{r['mean_trial_s']:>12.1f} {r['peak_mem_mb']:>13.1f} {r['accuracy']:>8.3f}")  # fmt: skip
    print(json.dumps({"device": where, "gpus": gpus, "trials": args.trials, "results": results}))


if __name__ == "__main__":
    main()
