"""The local backend: trials run one at a time in this process (the embedded default)."""

from __future__ import annotations

from attn_search.backends.base import Event, Finished, Job, OnRung, OnStart, TrialRunner


class LocalBackend:
    """Runs each job in this process, in :meth:`wait`, on the device the runner names."""

    name = "local"

    def __init__(self) -> None:
        self._job: Job | None = None
        self._runner: TrialRunner | None = None
        self._on_rung: OnRung = lambda number, step, accuracy, compute: False
        self._on_start: OnStart = lambda number, config: None

    def start(self, runner: TrialRunner, *, on_rung: OnRung, on_start: OnStart) -> None:
        self._runner, self._on_rung, self._on_start = runner, on_rung, on_start

    def slots(self) -> int:
        return 1

    def capacity(self) -> int:
        return 0 if self._job is not None else 1

    def submit(self, job: Job) -> None:
        assert self._job is None, "the local backend runs one trial at a time"
        self._job = job

    def wait(self, timeout: float) -> list[Event]:
        job, self._job = self._job, None
        if job is None or self._runner is None:
            return []
        number = job.number
        outcome = self._runner.run(
            job.values,
            on_rung=lambda step, accuracy, compute: self._on_rung(number, step, accuracy, compute),
            on_start=lambda config: self._on_start(number, config),
        )
        return [Finished(number, outcome)]

    def close(self) -> None:
        self._job = None
