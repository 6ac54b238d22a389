"""Trials per hour: one trial at a time against populations (``attn_search.engine.population``).

Draws ``--trials`` proposals of the sparse space with a seeded random sampler, trains them one by
one with ``evaluate`` (the baseline), then as populations of each ``--sizes`` (proposals grouped by
shape, each group cut into populations of at most K members, each trained by ``evaluate_many``).
Prints trials per hour, the speedup over the baseline measured in the same run, and the peak
device memory; the last line is one JSON object.

Usage::

    python benchmarks/gpu_throughput.py                               # auto device, sizes 1 8 32 128
    python benchmarks/gpu_throughput.py --device cpu --trials 8 --steps 40 --sizes 1 4
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from typing import Any

import optuna
import torch

from attn_search.engine.config import AttentionConfig
from attn_search.engine.population import evaluate_many, shape_key
from attn_search.engine.trainer import PRESETS, evaluate, resolve_device
from attn_search.space import load_space


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


def run(configs: list[AttentionConfig], size: int, budget: Any, device: torch.device) -> tuple[float, float, float]:
    """Seconds, trials per hour and mean accuracy of training ``configs`` in populations of ``size``
    (0: one by one with ``evaluate``)."""
    reset_peak(device)
    start = time.perf_counter()
    accs = []
    if size == 0:
        for c in configs:
            accs.append(evaluate(c, "mqar", budget=budget, device=device).metrics["accuracy"])
    else:
        groups: dict[Any, list[AttentionConfig]] = {}
        for c in configs:
            groups.setdefault(shape_key(c), []).append(c)
        for members in groups.values():
            for i in range(0, len(members), size):
                accs += [r.metrics["accuracy"] for r in evaluate_many(members[i : i + size], "mqar", budget=budget,
                                                                      device=device)]  # fmt: skip
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    return seconds, 3600 * len(configs) / seconds, sum(accs) / len(accs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument("--trials", type=int, default=64)
    parser.add_argument("--steps", type=int, default=PRESETS["default"].steps)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    device = resolve_device(args.device)
    budget = PRESETS["default"].__class__(steps=args.steps, rungs=PRESETS["default"].rungs,
                                          n_eval=PRESETS["default"].n_eval, latency_batch=PRESETS["default"].latency_batch)  # fmt: skip
    configs = proposals(args.trials, args.seed)
    groups = {shape_key(c) for c in configs}
    print(f"{args.trials} proposals of the sparse space ({len(groups)} shapes), {args.steps} steps each, on {device}")
    base_s, base_tph, base_acc = run(configs, 0, budget, device)
    base_mem = peak_mb(device)
    print(f"{'one by one':<14} {base_s:8.1f} s {base_tph:10.0f} trials/h  speedup  1.00x  peak {base_mem:8.0f} MiB  "
          f"mean acc {base_acc:.3f}", flush=True)  # fmt: skip
    sizes: dict[str, dict[str, float]] = {}
    for k in args.sizes:
        seconds, tph, acc = run(configs, k, budget, device)
        mem = peak_mb(device)
        sizes[str(k)] = {"trials_per_hour": tph, "speedup": tph / base_tph, "seconds": seconds, "peak_mem_mb": mem,
                         "mean_accuracy": acc}  # fmt: skip
        print(f"{'population ' + str(k):<14} {seconds:8.1f} s {tph:10.0f} trials/h  speedup {tph / base_tph:5.2f}x  "
              f"peak {mem:8.0f} MiB  mean acc {acc:.3f}", flush=True)  # fmt: skip
    print(json.dumps({"device": str(device), "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
                      "trials": args.trials, "steps": args.steps, "baseline_trials_per_hour": base_tph,
                      "baseline_peak_mem_mb": base_mem, "baseline_mean_accuracy": base_acc, "sizes": sizes}))  # fmt: skip


if __name__ == "__main__":
    main()
