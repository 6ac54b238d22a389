"""What every backend shares: the job it is given, the events it gives back, the commands it
carries, the scoring of one slot's jobs (:class:`SlotRun`), and the :class:`Backend` interface the
search loop drives.

A backend decides *where* a slot runs (this process, a Ray worker on some node). It never decides
what to propose, whether to stop a trial early or what to record: it carries events up (a trial
started, reached a rung, finished; a population's slot is vacant) and the loop's commands down
(stop a trial at its rung, admit a job into a vacant slot). Nothing in a backend calls the loop.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch

from attn_search.engine import metrics as M
from attn_search.engine.config import AttentionConfig
from attn_search.engine.tasks import make_task
from attn_search.engine.trainer import (
    Budget,
    Computed,
    Ended,
    PopulationEvent,
    Rung,
    Training,
    TrialResult,
    resolve_device,
)
from attn_search.search.evaluators import Evaluator, make_evaluator
from attn_search.search.failures import error_attrs
from attn_search.search.space import SearchSpace

CUT_SHORT = "cut short by the time budget"
"""Reason of a trial whose training the search's time budget ended (recorded ``pruned``)."""


@dataclasses.dataclass(frozen=True)
class Job:
    """One trial to run: the study's trial number and the proposal's active parameter values."""

    number: int
    values: dict[str, Any]


@dataclasses.dataclass
class TrialOutcome:
    """What one proposal produced: its state, the attributes recorded with it, its objective values."""

    state: str
    attrs: dict[str, Any]
    values: tuple[float, ...] | None = None

    @property
    def reason(self) -> str:
        return str(self.attrs.get("reason", self.state))


@dataclasses.dataclass(frozen=True)
class Started:
    """Event: trial ``number`` began training (or looking up) ``config``."""

    number: int
    config: AttentionConfig


@dataclasses.dataclass(frozen=True)
class AtRung:
    """Event: trial ``number`` reached a rung and waits there for the loop's decision: a
    :meth:`Backend.stop` before the next :meth:`Backend.wait` ends it (``pruned``)."""

    number: int
    step: int
    accuracy: float
    compute: dict[str, float]


@dataclasses.dataclass(frozen=True)
class Finished:
    """Event: trial ``number`` ended with ``outcome``."""

    number: int
    outcome: TrialOutcome


@dataclasses.dataclass(frozen=True)
class Vacant:
    """Event: seat ``index`` of the population whose first trial is ``population`` is free; a
    :meth:`Backend.admit` before the next :meth:`Backend.wait` fills it (continuous batching)."""

    population: int
    index: int


@dataclasses.dataclass(frozen=True)
class Note:
    """Event: a line for the console (a retried worker, a restored experiment)."""

    text: str


Event = Started | AtRung | Finished | Vacant | Note


class Backend(Protocol):
    """Where trials run. The loop calls :meth:`start`, then repeatedly :meth:`capacity` /
    :meth:`submit` / :meth:`wait` (answering the events with :meth:`stop` and :meth:`admit`), then
    :meth:`close`.

    A *slot* runs one job or a population of jobs (``--population K``): the jobs of one
    :meth:`submit` train together, as one model where their shapes agree, in one place."""

    name: str

    def start(self, runner: TrialRunner) -> None:
        """Get ready to run slots with ``runner`` (connect to a cluster, restore an experiment)."""

    def slots(self) -> int:
        """How many slots run at once."""

    def device_kind(self) -> str:
        """``cpu`` or ``cuda``: what trials run on (after :meth:`start`)."""

    def capacity(self) -> int:
        """How many more slots it takes now."""

    def submit(self, jobs: Sequence[Job]) -> None:
        """Run ``jobs`` in one slot (now or as soon as a worker is free)."""

    def wait(self, timeout: float) -> list[Event]:
        """Events since the last call; waits up to ``timeout`` seconds for one. The commands given
        since the last call reach their slots first. The local backend trains its slot here, in
        this thread, until the slot has something to say."""

    def stop(self, number: int) -> None:
        """Command: end trial ``number`` at the rung it just reported (an :class:`AtRung`)."""

    def admit(self, population: int, index: int, job: Job) -> None:
        """Command: run ``job`` in the seat a :class:`Vacant` event named."""

    def close(self) -> None:
        """Stop: jobs not started are dropped, running ones cancelled."""


@dataclasses.dataclass
class TrialRunner:
    """Runs one proposal to its outcome: config, training (or an evaluator's lookup), constraints, state.

    Backend-neutral, so the local backend (in this process) and the Ray backend (inside a Ray Tune
    trainable on any node) score a proposal the same way. It must stay picklable.
    """

    space: SearchSpace
    budget: Budget
    task: str
    task_kwargs: dict[str, Any]
    seed: int
    device: str = "auto"
    max_flops: float | None = None
    max_latency_ms: float | None = None
    evaluator: str = "training"
    """``training``, ``table:PATH`` or ``module:callable`` (see :func:`attn_search.search.evaluators.make_evaluator`)."""
    deadline: float | None = None
    """Wall-clock time (``time.time()``) at which training stops and the trial evaluates."""
    _lookup: Evaluator | None = dataclasses.field(default=None, repr=False, compare=False)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_lookup"] = None  # rebuilt where the runner is unpickled (a table is read once per worker)
        return state

    def run(
        self,
        values: dict[str, Any],
        *,
        on_rung: Callable[[int, float, dict[str, float]], bool] = lambda step, acc, compute: False,
        on_start: Callable[[AttentionConfig], None] = lambda config: None,
    ) -> TrialOutcome:
        """Score ``values`` alone (a :class:`SlotRun` of one job, driven here): ``on_rung(step,
        accuracy, compute)`` returns ``True`` to stop it.

        Never raises for a trial's own failure: any exception inside the trial gives a ``failed``
        outcome whose ``reason`` is the exception's type and message and whose ``traceback``
        attribute holds the rest (:func:`attn_search.search.failures.error_attrs`)."""
        slot = SlotRun(self, [Job(0, values)])
        outcome = TrialOutcome(M.FAILED, {"reason": "it never ended"})
        while not slot.done:
            for event in slot.advance():
                if isinstance(event, Started):
                    on_start(event.config)
                elif isinstance(event, AtRung) and on_rung(event.step, event.accuracy, event.compute):
                    slot.stop(event.number)
                elif isinstance(event, Finished):
                    outcome = event.outcome
        return outcome

    def lookup(self) -> Evaluator:
        """The evaluator that stands in for training (built once where the runner is unpickled)."""
        if self._lookup is None:
            self._lookup = make_evaluator(self.evaluator, self.space)
        return self._lookup

    def rung_steps(self) -> list[int]:
        """The steps at which a trial reports: the budget's rungs, or a recorded table's (its learning
        curves' steps), so that early stopping replays on a table as it ran when it was recorded."""
        curves = getattr(self.lookup(), "curves", None) if self.evaluator != "training" else None
        steps = sorted({int(s) for curve in (curves or {}).values() for s, _ in curve})
        return steps if len(steps) > 1 else self.budget.rung_steps()

    def _look_up(
        self, config: AttentionConfig, values: dict[str, Any], attrs: dict[str, Any], put: Callable[[str, Any], None]
    ) -> TrialOutcome:
        lookup = self.lookup()
        started = time.perf_counter()
        found = lookup(config, values)
        if found is None:
            put("reason", "the evaluator has no result for this configuration")
            put("state", M.FAILED)
            return TrialOutcome(M.FAILED, attrs)
        found = {**found, M.WALL_SECONDS: time.perf_counter() - started}
        for key, value in (("metrics", found), ("state", M.COMPLETE), ("device", "table")):
            put(key, value)
        return self._finish(attrs, found, M.COMPLETE)

    def _finish(self, attrs: dict[str, Any], metrics: dict[str, float], state: str) -> TrialOutcome:
        constraints = {}
        if self.max_flops is not None:
            constraints[M.FLOPS] = metrics[M.FLOPS] - self.max_flops
        if self.max_latency_ms is not None:
            constraints[M.LATENCY_MS] = metrics[M.LATENCY_MS] - self.max_latency_ms
        if constraints:
            attrs["constraints"] = constraints
        if state != M.COMPLETE:
            return TrialOutcome(state, attrs)
        values = tuple(float(metrics[m]) for m in self.space.metrics)
        if any(math.isnan(v) for v in values):
            attrs["reason"] = "no accuracy was measured"
            attrs["state"] = M.FAILED
            return TrialOutcome(M.FAILED, attrs)
        return TrialOutcome(M.COMPLETE, attrs, values)


class SlotRun:
    """One slot's jobs, steppable: trained as populations (one model per shape,
    :class:`~attn_search.engine.trainer.Training`) or looked up by the runner's evaluator.
    :meth:`advance` returns the backend's events (:class:`Started`, :class:`AtRung`,
    :class:`Finished`, :class:`Vacant`); :meth:`stop` and :meth:`admit` are the loop's commands.
    Members are named by their trial numbers. What the local backend runs in the loop's thread and
    a Ray worker runs in a Tune trial.

    Never raises for the trials' own failures (see :meth:`TrialRunner.run`). One member's error
    does not fail its companions: each that had not ended trains again alone, and only the ones
    that raise again fail (with their own error). The population's error travels with the first
    of them (the loop writes it to errors.log and says so on the console): a fallback is never
    silent, since on a GPU it costs most of the speed."""

    def __init__(self, runner: TrialRunner, jobs: Sequence[Job]) -> None:
        self.runner = runner
        self.population = jobs[0].number
        self.budget = runner.budget
        self.attrs: dict[int, dict[str, Any]] = {}
        self.configs: dict[int, AttentionConfig] = {}  # every member that started, in order
        self._open: set[int] = set()  # members started and not finished
        self._compute: dict[int, dict[str, float]] = {}
        self._curves: dict[int, list[tuple[int, float]]] = {}
        self._at_rung: dict[int, int] = {}  # member -> the step of the rung it waits at
        self._events: list[Event] = []
        self._training: Training | None = None
        self._alone: list[int] | None = None  # after a population's error: members to train again, one by one
        self._alone_now: int | None = None  # the one training alone now
        # a population refills its freed seats; a single trial is a population of one that does not
        # (its compute figures, latency included, are its own)
        self._refills = len(jobs) > 1
        for job in jobs:
            self._configure(job)
        # a lookup of a table with learning curves replays its rungs: number -> (outcome, curve, rungs said)
        self._replaying: dict[int, tuple[TrialOutcome, list[tuple[int, float]], int]] = {}
        if runner.evaluator != "training":  # recorded (or a user's own) results instead of training
            values = {job.number: job.values for job in jobs}
            for number, config in self.configs.items():
                self._look_up(number, config, values[number])
        elif self.configs:
            try:
                self._training = self._new_training(list(self.configs.items()))
            except Exception as exc:
                self._fell_over(exc)

    @property
    def done(self) -> bool:
        return self._training is None and not self._replaying and not self._events

    def advance(self) -> list[Event]:
        """Train until there is something to say; return it (and anything the commands produced)."""
        if any(isinstance(e, Vacant) for e in self._events):  # a seat to fill again before training on
            events, self._events = self._events, []
            return events
        stopped = {n for n, step in self._at_rung.items() if step < 0}
        self._at_rung.clear()  # rungs not stopped go on
        if self._replaying:
            self._replay(stopped)
        if self._training is not None:
            try:
                for event in self._training.advance():
                    self._translate(event)
            except Exception as exc:
                self._fell_over(exc)
            if self._training is not None and self._training.done:
                self._next_alone()
        events, self._events = self._events, []
        return events

    def stop(self, number: int) -> None:
        """End ``number`` at the rung it waits at (stopping after the last step would only discard it)."""
        step = self._at_rung.get(number)
        if number in self._replaying and step is not None and step >= 0:
            last = self._replaying[number][1][-1][0]
            if step < last:
                self._at_rung[number] = -1  # (replayed: it ends at the next advance)
            return
        self._at_rung.pop(number, None)
        if step is not None and step < self.budget.steps and self._training is not None:
            self._training.stop(number)

    def admit(self, index: int, job: Job) -> None:
        """Start ``job`` in vacant seat ``index`` (a job of another shape waits for a population of
        its own). A job whose values make no valid configuration fails, and the seat is vacant
        again; an error while admitting is the population's (its members train again alone)."""
        config = self._configure(job)
        if config is None:
            if self._training is not None and self._alone is None:
                self._events.append(Vacant(self.population, index))
            return
        if self._alone is not None or self._training is None:  # the population fell over meanwhile
            self._alone = [*(self._alone or []), job.number]
            if self._training is None:
                self._next_alone()
            return
        try:
            self._training.admit(index, job.number, config)
        except Exception as exc:
            self._fell_over(exc)

    # -- inside ------------------------------------------------------------------------------------
    def _put(self, number: int, key: str, value: Any) -> None:
        self.attrs[number][key] = value

    def _look_up(self, number: int, config: AttentionConfig, values: dict[str, Any]) -> None:
        put = functools.partial(self._put, number)
        try:
            outcome = self.runner._look_up(config, values, self.attrs[number], put)
            curve = getattr(self.runner.lookup(), "curve", None)
            curve = curve(values) if curve is not None and outcome.state == M.COMPLETE else []
        except Exception as exc:
            self._finish(number, _failed(exc, self.attrs[number], put))
            return
        if len(curve) > 1:
            outcome.attrs["metrics"][M.STEPS] = float(curve[-1][0])
            self._replaying[number] = (outcome, [(int(st), float(a)) for st, a in curve], 0)
        else:
            self._finish(number, outcome)

    def _replay(self, stopped: set[int]) -> None:
        """The next recorded rung of every replayed lookup, or its end: stopped at its rung
        (``pruned``, its accuracy and steps there), or complete after its last."""
        for number, (outcome, curve, said) in list(self._replaying.items()):
            if number in stopped or said == len(curve):
                del self._replaying[number]
                if number in stopped:
                    step, accuracy = curve[said - 1]
                    metrics = {**outcome.attrs["metrics"], M.ACCURACY: accuracy, M.STEPS: float(step)}
                    attrs = self.attrs[number]
                    attrs.update(metrics=metrics, state=M.PRUNED, reason=f"stopped early at step {step}")
                    outcome = self.runner._finish(attrs, metrics, M.PRUNED)
                self._finish(number, outcome)
                continue
            step, accuracy = curve[said]
            self._replaying[number] = (outcome, curve, said + 1)
            self._put(number, "curve", [list(p) for p in curve[: said + 1]])
            self._at_rung[number] = step
            compute = {m: v for m, v in outcome.attrs["metrics"].items() if m != M.ACCURACY}
            self._events.append(AtRung(number, step, accuracy, compute))

    def _configure(self, job: Job) -> AttentionConfig | None:
        attrs: dict[str, Any] = {}
        self.attrs[job.number] = attrs
        try:
            config = self.runner.space.make_config(job.values, seed=self.runner.seed)
        except ValueError as exc:
            attrs.update(reason=f"invalid configuration: {exc}", state=M.FAILED)
            self._events.append(Finished(job.number, TrialOutcome(M.FAILED, attrs)))
            return None
        attrs["config"] = config.to_dict()
        self.configs[job.number] = config
        self._open.add(job.number)
        self._events.append(Started(job.number, config))
        return config

    def _new_training(self, members: list[tuple[int, AttentionConfig]]) -> Training:
        budget = self.budget
        if self.runner.deadline is not None:  # the last trials stop training at the deadline, then evaluate
            budget = dataclasses.replace(budget, time_limit_s=max(5.0, self.runner.deadline - time.time()))
        return Training(members, make_task(self.runner.task, **self.runner.task_kwargs), budget,
                        resolve_device(self.runner.device), heads=self.runner.space.head_range())  # fmt: skip

    def _translate(self, event: PopulationEvent) -> None:
        if isinstance(event, Computed):
            self._compute[event.member] = dict(event.figures)
            self._put(event.member, "compute", event.figures)
        elif isinstance(event, Rung):
            curve = self._curves.setdefault(event.member, [])
            curve.append((event.step, event.accuracy))
            self._put(event.member, "curve", list(curve))
            self._at_rung[event.member] = event.step
            self._events.append(AtRung(event.member, event.step, event.accuracy,
                                       dict(self._compute.get(event.member, {}))))  # fmt: skip
        elif isinstance(event, Ended):
            self._ended(event.member, event.result)
        elif self._refills and self._alone is None:  # Freed (a fallback refills nothing)
            self._events.append(Vacant(self.population, event.slot))

    def _ended(self, number: int, result: TrialResult) -> None:
        if result.state == M.PRUNED and result.curve:
            result.reason = f"stopped early at step {result.curve[-1][0]}"
        ran = int(result.metrics.get(M.STEPS, self.budget.steps) or 0)
        if result.state == M.COMPLETE and ran < self.budget.steps:
            # cut short by the search's time budget: its accuracy is not the budget's, so it must
            # not sit on the front as if it were; it keeps its metrics and says why
            result.state = M.PRUNED
            result.reason = f"{CUT_SHORT} at step {ran} of {self.budget.steps}"
        attrs = self.attrs[number]
        attrs.update(metrics=result.metrics, state=result.state, device=result.device, task=result.task)
        if result.reason:
            attrs["reason"] = result.reason
        self._finish(number, self.runner._finish(attrs, result.metrics, result.state))

    def _finish(self, number: int, outcome: TrialOutcome) -> None:
        self._open.discard(number)
        self._events.append(Finished(number, outcome))

    def _fell_over(self, exc: Exception) -> None:
        left = [n for n in self.configs if n in self._open]
        if self._alone is not None or len(self.configs) == 1:  # a member alone raised: it fails
            for number in [self._alone_now] if self._alone is not None else left:
                if number is not None:
                    self._finish(number, _failed(exc, self.attrs[number], functools.partial(self._put, number)))
            self._next_alone()
            return
        self._events = [e for e in self._events if not isinstance(e, Vacant)]  # no population to refill now
        error = error_attrs(exc)
        if left:
            self.attrs[left[0]]["population_error"] = {"reason": error["reason"], "traceback": error["traceback"],
                                                       "members": len(self.configs)}  # fmt: skip
        _free_device_memory()
        self._alone = left
        self._training = None
        self._next_alone()

    def _next_alone(self) -> None:
        """The next member to train again alone after its population's error (``None``: none left)."""
        self._training, self._alone_now = None, None
        while self._alone:
            number = self._alone.pop(0)
            if number in self._open:
                self._curves.pop(number, None)
                self._compute.pop(number, None)
                self._alone_now = number
                try:
                    self._training = self._new_training([(number, self.configs[number])])
                except Exception as exc:
                    self._finish(number, _failed(exc, self.attrs[number], functools.partial(self._put, number)))
                    continue
                return


def _free_device_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # an out-of-memory trial must not starve the next one


def _failed(exc: Exception, attrs: dict[str, Any], put: Callable[[str, Any], None]) -> TrialOutcome:
    """The outcome of a trial that raised: ``failed``, with the error's attributes (reason, traceback)."""
    _free_device_memory()
    for key, value in error_attrs(exc).items():
        put(key, value)
    return TrialOutcome(M.FAILED, attrs)


@dataclasses.dataclass(frozen=True)
class BackendOptions:
    """The flags that belong to a backend (``--address``, ``--cpus-per-trial``, ``--gpus-per-trial``,
    ``--max-concurrent``: Ray's), and the device trials run on. Checked by
    :func:`attn_search.backends.check_backend`, not by the search."""

    address: str | None = None
    """``auto`` or ``HOST:PORT`` of a running cluster (none: start Ray on this machine)."""
    cpus_per_trial: float = 1.0
    gpus_per_trial: float | None = None
    """None: 1 if the cluster has GPUs (and the device is not cpu), else 0."""
    max_concurrent: int | None = None
    device: str = "auto"
