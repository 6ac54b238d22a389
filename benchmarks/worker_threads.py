"""Meta-training in worker processes: torch threads divided among the workers, or each worker's own.

The family-out benchmark and ``attn-search replay`` meta-train agents in spawned worker processes.
A spawned worker's torch starts with one thread per core, so ``--jobs`` workers run ``jobs x cores``
threads. :func:`attn_search.replay.worker_pool` gives each worker its share instead. This script
meta-trains the same agents (the candidate policy, :func:`attn_search.strategies.candidates.meta_train`,
on the shipped tables) both ways, in the order own, divided, divided, own (so that neither gains
from going second), and prints each agent's seconds and the ratio of the two mean wall times. Run
it with nothing else on the machine.

Usage::

    python benchmarks/worker_threads.py                       # 4 agents, 2 workers, 2048 steps each
    python benchmarks/worker_threads.py --agents 2 --steps 1024
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import tempfile
import time
from pathlib import Path

import torch

from attn_search.replay import worker_pool

ROOT = Path(__file__).resolve().parents[1]
TABLES = [ROOT / "tables" / f"{t}.csv" for t in ("mqar-64", "listops-64", "ngram-64", "delay-64")]


def train(seed: int, steps: int, folder: str) -> tuple[int, float]:
    from attn_search.strategies.candidates import meta_train

    start = time.perf_counter()
    meta_train([str(t) for t in TABLES], steps=steps, seed=seed, out=Path(folder) / f"agent-{seed}.zip")
    return torch.get_num_threads(), time.perf_counter() - start


def run(pool: concurrent.futures.Executor, agents: int, steps: int) -> tuple[float, list[tuple[int, float]]]:
    with tempfile.TemporaryDirectory() as folder, pool:
        start = time.perf_counter()
        made = list(pool.map(train, range(agents), [steps] * agents, [folder] * agents))
        return time.perf_counter() - start, made


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--agents", type=int, default=4)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2048)
    args = parser.parse_args()
    print(f"{args.agents} agents of {args.steps} steps on {args.jobs} workers; this process has "
          f"{torch.get_num_threads()} torch threads", flush=True)  # fmt: skip
    spawn = multiprocessing.get_context("spawn")
    walls: dict[str, list[float]] = {"own threads": [], "divided": []}
    for name in ("own threads", "divided", "divided", "own threads"):
        pool = concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=spawn) if name == "own threads" else None
        wall, made = run(pool or worker_pool(args.jobs), args.agents, args.steps)
        walls[name].append(wall)
        each = " ".join(f"{s:.1f}" for _, s in made)
        print(f"{name:<12} threads per worker {made[0][0]}: wall {wall:.1f} s; per agent {each} s", flush=True)
    own, divided = (sum(w) / len(w) for w in walls.values())
    print(f"mean wall time, own threads {own:.1f} s / divided {divided:.1f} s: {own / divided:.2f}x")


if __name__ == "__main__":
    main()
