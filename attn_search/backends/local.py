"""The local backend: one slot at a time in this process (the embedded default)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from attn_search.backends.base import Event, Finished, Job, OnRung, OnStart, TrialRunner


class LocalBackend:
    """Runs each slot (one job, or a population of jobs) in this process, in :meth:`wait`, on the
    device the runner names. A population's freed slots are refilled with the loop's next
    proposals (``ask``) while it trains, and each member's outcome is recorded (``record``) as soon
    as it ends, so the strategy hears it before it proposes again."""

    name = "local"

    def __init__(self) -> None:
        self._jobs: list[Job] = []
        self._runner: TrialRunner | None = None
        self._on_rung: OnRung = lambda number, step, accuracy, compute: False
        self._on_start: OnStart = lambda number, config: None
        self._ask: Callable[[int], Job | None] | None = None
        self._record: Callable[[Event], None] | None = None

    def start(self, runner: TrialRunner, *, on_rung: OnRung, on_start: OnStart,
              ask: Callable[[int], Job | None] | None = None, record: Callable[[Event], None] | None = None) -> None:  # fmt: skip
        self._runner, self._on_rung, self._on_start = runner, on_rung, on_start
        self._ask, self._record = ask, record

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
        numbers = [job.number for job in jobs]  # member i is trial numbers[i]; refills append
        recorded: set[int] = set()

        def refill() -> tuple[int, dict] | None:
            job = self._ask(numbers[0]) if self._ask is not None and len(jobs) > 1 else None
            if job is None:
                return None
            numbers.append(job.number)
            return job.number, job.values

        def on_outcome(i: int, outcome: object) -> None:
            if self._record is not None:
                recorded.add(i)
                self._record(Finished(numbers[i], outcome))  # type: ignore[arg-type]

        outcomes = self._runner.run_many(
            [job.values for job in jobs],
            on_rungs=lambda rungs: [self._on_rung(numbers[i], step, acc, compute) for i, step, acc, compute in rungs],
            on_start=lambda i, config: self._on_start(numbers[i], config),
            refill=refill, on_outcome=on_outcome,
        )  # fmt: skip
        return [Finished(numbers[i], outcome) for i, outcome in enumerate(outcomes) if i not in recorded]

    def close(self) -> None:
        self._jobs = []
