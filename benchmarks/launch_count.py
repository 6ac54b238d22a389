"""Aten ops per member: what a GPU launches for a trial, one by one against populations.

A trial of the default space is a tiny model: on a GPU each of its steps costs about one kernel
launch per aten op, whatever the op's size, so ops per member-step is what a population divides.
Counted on any device with a ``TorchDispatchMode`` (every aten op the training runs, forward,
backward and optimiser), on a real population of the trainer (``attn_search.engine.trainer``):

* one by one: ``K = 1`` with the kernel CUDA would choose counted as one attention op (SDPA;
  FlexAttention is also one op, and its CPU backward does not exist). A forced kernel keeps the
  member model; a lone trial of a search trains the plain model (``engine/single.py``), which has
  the same layers and also calls one attention op on CUDA, so this stands in for it;
* populations as CUDA runs them: one attention call per head group (the grouped layout), evaluation
  passes of 256 sequences per member;
* populations of ``--sizes`` mixed proposals of the sparse space (head counts 2/4/8, every pattern);
* per step, and per default trial: the timed latency passes, ``steps`` training steps, the rungs'
  evaluation passes and (populations) the refill of each slot, divided by the members.

Prints a table and the ratios against one by one; the last line is one JSON object.

Usage::

    python benchmarks/launch_count.py [--sizes 8 16 32 64] [--trials 64]
"""

from __future__ import annotations

import argparse
import json
import statistics
import warnings
from collections.abc import Callable
from typing import Any

import optuna
import torch
from gpu_throughput import proposals  # the same seeded draw of sparse-space proposals
from torch.utils._python_dispatch import TorchDispatchMode

from attn_search.engine import trainer as T
from attn_search.engine.config import AttentionConfig
from attn_search.engine.tasks import make_task


class Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.n += 1
        return func(*args, **(kwargs or {}))


def ops(fn: Callable[[], Any]) -> int:
    with Count() as count:
        fn()
    return count.n


def count(configs: list[AttentionConfig], budget: T.Budget, device: torch.device, kernel: str) -> dict[str, float]:
    """Ops of one population of ``configs``: per step (median of 5 after 2 warm-up steps), the
    latency measurement, one evaluation pass, and one refill."""
    task = make_task("mqar")
    with torch.random.fork_rng():
        # what CUDA runs: the grouped attention layout for all members (the CPU otherwise attends per
        # member, which costs ops per member but saves arithmetic there)
        pop = T.Population(list(enumerate(configs)), task, budget, device, kernel, member_layout="grouped")
        pop.eval_batch = 256  # CUDA's evaluation passes (the CPU chunks them by K to save memory)
        measure = ops(pop.measure)
        for _ in range(2):
            pop.train_step()
        steps = [ops(pop.train_step) for _ in range(5)]
        evaluate = ops(pop.accuracies)
        refill = ops(lambda: pop._admit(0, 0, configs[-1])) if len(configs) > 1 else 0
    return {"step": statistics.median(steps), "measure": measure, "eval": evaluate, "refill": refill}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--trials", type=int, default=64, help="sparse-space proposals drawn (seeded)")
    parser.add_argument("--steps", type=int, default=T.PRESETS["default"].steps, help="steps of a default trial")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    device = torch.device("cpu")
    budget = T.PRESETS["default"]
    rungs = len(budget.rung_steps())
    configs = [c for c in proposals(args.trials, args.seed) if c.d_model == proposals(1, args.seed)[0].d_model]

    def per_trial(figures: dict[str, float], K: int) -> float:
        whole = figures["measure"] + args.steps * figures["step"] + rungs * figures["eval"]
        return whole / K + figures["refill"]  # in a search every member after the first K enters by refill

    singles = [count([c], budget, device, "reference") for c in configs[:8]]
    one = {key: statistics.mean(f[key] for f in singles) for key in singles[0]}
    one_trial = per_trial(one, 1)
    print(f"aten ops, sparse-space proposals (d_model {configs[0].d_model}), {args.steps}-step trials, {rungs} rungs")
    print(f"{'':<16}{'per member-step':>16}{'step ratio':>12}{'per trial':>12}{'trial ratio':>12}")
    print(f"{'one by one':<16}{one['step']:>16.0f}{1.0:>11.2f}x{one_trial:>12.0f}{1.0:>11.2f}x")
    rows: dict[str, Any] = {}
    for K in args.sizes:
        members = [configs[i % len(configs)].replace(seed=i) for i in range(K)]
        figures = count(members, budget, device, "auto")
        step, trial = figures["step"] / K, per_trial(figures, K)
        rows[str(K)] = {**figures, "per_member_step": step, "step_ratio": one["step"] / step, "per_trial": trial,
                        "trial_ratio": one_trial / trial, "heads": sorted({c.n_heads for c in members})}  # fmt: skip
        print(f"{'population ' + str(K):<16}{step:>16.1f}{one['step'] / step:>11.2f}x{trial:>12.0f}"
              f"{one_trial / trial:>11.2f}x")  # fmt: skip
    print(json.dumps({"steps": args.steps, "one_by_one": {**one, "per_trial": one_trial}, "populations": rows}))


if __name__ == "__main__":
    main()
