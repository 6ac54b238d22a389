"""Trials per hour: one trial at a time against populations (``attn_search.engine.trainer.evaluate_many``).

Draws ``--trials`` proposals of the sparse space with a seeded random sampler, trains them one by
one with ``evaluate`` (the baseline), then as populations of each ``--sizes``: K slots filled with
the first proposals, each freed slot refilled with the next (continuous batching, as a search's
local backend does). ``--prune`` stops, at each rung before the last, a trial whose accuracy is
below the median of the earlier trials at that rung (a median rule: early stopping then returns
compute, to the populations through refills). Prints trials per hour, the speedup over the
baseline measured in the same run, and the peak device memory; the last line is one JSON object.
Each measurement runs in a process of its own with a compile cache directory of its own (cold
caches for every mode), so none inherits another's compiled kernels, allocator state or peak memory.

Usage::

    python benchmarks/gpu_throughput.py                               # auto device, sizes 1 8 32 128
    python benchmarks/gpu_throughput.py --device cpu --trials 8 --steps 40 --sizes 1 4
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from typing import Any

import optuna
import torch

from attn_search.engine.config import AttentionConfig
from attn_search.engine.model import shape_key
from attn_search.engine.trainer import PRESETS, evaluate, evaluate_many, resolve_device
from attn_search.search.space import load_space


def proposals(n: int, seed: int) -> list[AttentionConfig]:
    space = load_space("sparse")
    study = optuna.create_study(directions=space.directions, sampler=optuna.samplers.RandomSampler(seed=seed))
    out = []
    for _ in range(n):
        trial = study.ask()
        out.append(space.make_config(space.suggest(trial), seed=seed))
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
    return out


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    from attn_search.engine.cost import _status_kb

    return _status_kb("VmHWM") / 1024  # the process's peak resident set (CPU)


class MedianRule:
    """Stop a trial below the median accuracy of the earlier trials at the same rung (3 or more)."""

    def __init__(self, final_step: int) -> None:
        self.final, self.seen, self.stopped = final_step, {}, 0  # type: ignore[var-annotated]

    def __call__(self, member: int, step: int, accuracy: float) -> bool:
        earlier = self.seen.setdefault(step, [])
        stop = step < self.final and len(earlier) >= 3 and accuracy < statistics.median(earlier)
        earlier.append(accuracy)
        self.stopped += stop
        return stop


def run(configs: list[AttentionConfig], size: int, budget: Any, device: torch.device,
        prune: bool) -> tuple[float, float, float, int]:  # fmt: skip
    """Seconds, trials per hour, mean accuracy and trials pruned of training ``configs`` in
    populations of ``size`` with refills (0: one by one with ``evaluate``)."""
    reset_peak(device)
    start = time.perf_counter()
    accs = []
    rule = MedianRule(budget.steps) if prune else None
    if size == 0:
        for c in configs:
            reporter = (lambda step, acc: rule(0, step, acc)) if rule else None
            accs.append(evaluate(c, "mqar", budget=budget, device=device, reporter=reporter).metrics["accuracy"])
    else:
        queue = list(configs[size:])
        results = evaluate_many(configs[:size], "mqar", budget=budget, device=device, reporter=rule,
                                refill=lambda: queue.pop(0) if queue else None)  # fmt: skip
        accs = [r.metrics["accuracy"] for r in results]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    return seconds, 3600 * len(configs) / seconds, statistics.mean(accs), rule.stopped if rule else 0


def measure(args: argparse.Namespace, size: int) -> dict[str, float]:
    """Run one measurement (``size`` 0: the baseline) in a fresh process; returns its figures."""
    cmd = [sys.executable, __file__, "--device", args.device, "--trials", str(args.trials), "--steps", str(args.steps),
           "--seed", str(args.seed), "--one", str(size), *(["--prune"] if args.prune else [])]  # fmt: skip
    with tempfile.TemporaryDirectory() as cache:  # cold compile caches for every mode
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "TRITON_CACHE_DIR": os.path.join(cache, "triton")}
        done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise SystemExit(f"the measurement of size {size} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def one(args: argparse.Namespace, device: torch.device, budget: Any) -> None:
    configs = proposals(args.trials, args.seed)
    seconds, tph, acc, pruned = run(configs, args.one, budget, device, args.prune)
    print(json.dumps({"seconds": seconds, "trials_per_hour": tph, "peak_mem_mb": peak_mb(device),
                      "mean_accuracy": acc, "pruned": pruned, "shapes": len({shape_key(c) for c in configs})}))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument("--trials", type=int, default=64)
    parser.add_argument("--steps", type=int, default=PRESETS["default"].steps)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prune", action="store_true", help="stop trials below the median at a rung")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: one measurement, as JSON
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    device = resolve_device(args.device)
    budget = dataclasses.replace(PRESETS["default"], steps=args.steps)
    if args.one is not None:
        one(args, device, budget)
        return
    base = measure(args, 0)
    print(f"{args.trials} proposals of the sparse space ({base['shapes']:.0f} shapes), {args.steps} steps each, "
          f"on {device}{', median pruning' if args.prune else ''}", flush=True)  # fmt: skip
    print(f"{'one by one':<14} {base['seconds']:8.1f} s {base['trials_per_hour']:10.0f} trials/h  speedup  1.00x  "
          f"peak {base['peak_mem_mb']:8.0f} MiB  mean acc {base['mean_accuracy']:.3f}", flush=True)  # fmt: skip
    sizes: dict[str, dict[str, float]] = {}
    for k in args.sizes:
        got = measure(args, k)
        got["speedup"] = got["trials_per_hour"] / base["trials_per_hour"]
        sizes[str(k)] = got
        print(f"{'population ' + str(k):<14} {got['seconds']:8.1f} s {got['trials_per_hour']:10.0f} trials/h  "
              f"speedup {got['speedup']:5.2f}x  peak {got['peak_mem_mb']:8.0f} MiB  mean acc {got['mean_accuracy']:.3f}",
              flush=True)  # fmt: skip
    print(json.dumps({"device": str(device), "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
                      "trials": args.trials, "steps": args.steps, "prune": args.prune, "baseline_trials_per_hour": base["trials_per_hour"],
                      "baseline_peak_mem_mb": base["peak_mem_mb"], "baseline_mean_accuracy": base["mean_accuracy"],
                      "sizes": sizes}))  # fmt: skip


if __name__ == "__main__":
    main()
