"""The local backend: one slot at a time in this process (the embedded default)."""

from __future__ import annotations

from collections.abc import Sequence

from attn_search.backends.base import Event, Finished, Job, OnRung, OnStart, TrialRunner


class LocalBackend:
    """Runs each slot (one job, or a population of jobs) in this process, in :meth:`wait`, on the
    device the runner names."""

    name = "local"

    def __init__(self) -> None:
        self._jobs: list[Job] = []
        self._runner: TrialRunner | None = None
        self._on_rung: OnRung = lambda number, step, accuracy, compute: False
        self._on_start: OnStart = lambda number, config: None

    def start(self, runner: TrialRunner, *, on_rung: OnRung, on_start: OnStart) -> None:
        self._runner, self._on_rung, self._on_start = runner, on_rung, on_start

    def slots(self) -> int:
        return 1

    def device_kind(self) -> str:
        from attn_search.engine.trainer import resolve_device

        return resolve_device(self._runner.device if self._runner else "auto").type

    def capacity(self) -> int:
        return 0 if self._jobs else 1

    def submit(self, jobs: Sequence[Job]) -> None:
        assert not self._jobs, "the local backend runs one slot at a time"
        self._jobs = list(jobs)

    def wait(self, timeout: float) -> list[Event]:
        jobs, self._jobs = self._jobs, []
        if not jobs or self._runner is None:
            return []
        numbers = [job.number for job in jobs]
        outcomes = self._runner.run_many(
            [job.values for job in jobs],
            on_rungs=lambda step, rungs: [self._on_rung(numbers[i], step, acc, compute) for i, acc, compute in rungs],
            on_start=lambda i, config: self._on_start(numbers[i], config),
        )
        return [Finished(number, outcome) for number, outcome in zip(numbers, outcomes, strict=True)]

    def close(self) -> None:
        self._jobs = []
