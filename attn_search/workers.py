"""Worker processes for CPU-bound work in parallel (meta-training agents, replaying searches)."""

from __future__ import annotations

import concurrent.futures
import multiprocessing

import torch


def _pin_threads(n: int) -> None:
    torch.set_num_threads(n)


def worker_pool(jobs: int) -> concurrent.futures.ProcessPoolExecutor:
    """A pool of ``jobs`` spawned worker processes whose torch shares this process's threads among
    them. Why not the executor alone: a spawned worker's torch starts with one thread per core, so
    ``jobs`` workers run ``jobs`` times as many threads as there are cores
    (``benchmarks/worker_threads.py`` measures what that costs)."""
    threads = max(1, torch.get_num_threads() // jobs)
    return concurrent.futures.ProcessPoolExecutor(
        jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_pin_threads, initargs=(threads,)
    )
