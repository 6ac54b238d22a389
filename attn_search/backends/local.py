"""The local backend: one slot at a time in this process (the embedded default)."""

from __future__ import annotations

from collections.abc import Sequence

from attn_search.backends.base import Event, Job, SlotRun, TrialRunner


class LocalBackend:
    """Runs each slot (one job, or a population of jobs) in this process, on the device the runner
    names: :meth:`wait` trains it until it has something to say (a rung, a finished trial, a vacant
    seat) and returns that; the loop's answers (:meth:`stop`, :meth:`admit`) reach it before it
    trains on. So a population's freed seats are refilled with the loop's next proposals, and the
    strategy hears each outcome before it proposes again."""

    name = "local"

    def __init__(self) -> None:
        self._runner: TrialRunner | None = None
        self._slot: SlotRun | None = None

    def start(self, runner: TrialRunner) -> None:
        self._runner = runner

    def slots(self) -> int:
        return 1

    def device_kind(self) -> str:
        from attn_search.engine.trainer import resolve_device

        return resolve_device(self._runner.device if self._runner else "auto").type

    def capacity(self) -> int:
        return 0 if self._slot is not None else 1

    def submit(self, jobs: Sequence[Job]) -> None:
        assert self._slot is None and self._runner is not None, "the local backend runs one slot at a time"
        self._slot = SlotRun(self._runner, jobs)

    def wait(self, timeout: float) -> list[Event]:
        if self._slot is None:
            return []
        events = self._slot.advance()
        if self._slot.done:
            self._slot = None
        return events

    def stop(self, number: int) -> None:
        if self._slot is not None:
            self._slot.stop(number)

    def admit(self, population: int, index: int, job: Job) -> None:
        assert self._slot is not None and self._slot.population == population, "no such population here"
        self._slot.admit(index, job)

    def close(self) -> None:
        self._slot = None
