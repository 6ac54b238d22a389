"""What every backend shares: the job it is given, the events it gives back, the scoring of one
proposal (:class:`TrialRunner`), and the :class:`Backend` interface the search loop drives.

A backend decides *where* a trial runs (this process, a Ray worker on some node). It never decides
what to propose, whether to stop a trial early or what to record: the loop hands it jobs, answers
its rung reports through ``on_rung`` (the early-stopping rule) and records what it returns.
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
from attn_search.engine.trainer import Budget, TrialResult, evaluate_many
from attn_search.search.evaluators import Evaluator, make_evaluator
from attn_search.search.failures import error_attrs
from attn_search.search.space import SearchSpace

OnRung = Callable[[int, int, float, dict[str, float]], bool]
"""``on_rung(number, step, accuracy, compute)``: the loop's early-stopping rule; ``True`` stops
the trial. Backends call it while the trial runs (from any thread)."""
OnRungs = Callable[[Sequence[tuple[int, int, float, dict[str, float]]]], Sequence[bool]]
"""``on_rungs([(i, step, accuracy, compute), ...])``: the rungs a population's members reached at
one point of training (each at its own step), one stop flag back for each (see
:meth:`TrialRunner.run_many`)."""
Refill = Callable[[], "tuple[int, dict[str, Any]] | None"]
"""``refill()``: the next proposal ``(number, values)`` for a slot a finished member freed, or ``None``."""
CUT_SHORT = "cut short by the time budget"
"""Reason of a trial whose training the search's time budget ended (recorded ``pruned``)."""
OnStart = Callable[[int, AttentionConfig], None]
"""``on_start(number, config)``: a trial began (progress)."""


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
class Finished:
    """Event: trial ``number`` ended with ``outcome``."""

    number: int
    outcome: TrialOutcome


@dataclasses.dataclass(frozen=True)
class Note:
    """Event: a line for the console (a retried worker, a restored experiment)."""

    text: str


Event = Finished | Note


class Backend(Protocol):
    """Where trials run. The loop calls, in this order: :meth:`start`, then repeatedly
    :meth:`capacity` / :meth:`submit` / :meth:`wait`, then :meth:`close`.

    A *slot* runs one job or a population of jobs (``--population K``): the jobs of one
    :meth:`submit` train together, as one model where their shapes agree, in one place."""

    name: str

    def start(self, runner: TrialRunner, *, on_rung: OnRung, on_start: OnStart,
              ask: Callable[[int], Job | None] | None = None, record: Callable[[Event], None] | None = None) -> None:  # fmt: skip
        """Get ready to run trials with ``runner`` (connect to a cluster, restore an experiment).
        ``ask(slot)`` gives the loop's next job for a freed slot of the population whose first
        trial is ``slot`` (``None``: none now), and ``record(event)`` records a member that ended
        before its population did (both backends refill)."""

    def slots(self) -> int:
        """How many slots run at once."""

    def device_kind(self) -> str:
        """``cpu`` or ``cuda``: what trials run on (after :meth:`start`)."""

    def capacity(self) -> int:
        """How many more slots it takes now."""

    def submit(self, jobs: Sequence[Job]) -> None:
        """Run ``jobs`` in one slot (now or as soon as a worker is free)."""

    def wait(self, timeout: float) -> list[Event]:
        """Events since the last call; waits up to ``timeout`` seconds for one. The local backend
        runs its slot here, in this thread."""

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
        on_attr: Callable[[str, Any], None] = lambda key, value: None,
        on_rung: Callable[[int, float, dict[str, float]], bool] = lambda step, acc, compute: False,
        on_start: Callable[[AttentionConfig], None] = lambda config: None,
    ) -> TrialOutcome:
        """Score ``values``. ``on_attr(key, value)`` sees each attribute as soon as it is known (an
        interrupted trial keeps them); ``on_rung(step, accuracy, compute)`` returns ``True`` to stop.

        Never raises for a trial's own failure: any exception inside the trial gives a ``failed``
        outcome whose ``reason`` is the exception's type and message and whose ``traceback``
        attribute holds the rest (:func:`attn_search.search.failures.error_attrs`)."""
        return self.run_many(
            [values],
            on_attr=lambda i, key, value: on_attr(key, value),
            on_rungs=lambda rungs: [on_rung(step, acc, compute) for _, step, acc, compute in rungs],
            on_start=lambda i, config: on_start(config),
        )[0]

    def run_many(
        self,
        members: Sequence[dict[str, Any]],
        *,
        on_attr: Callable[[int, str, Any], None] = lambda i, key, value: None,
        on_rungs: OnRungs = lambda rungs: [False] * len(rungs),
        on_start: Callable[[int, AttentionConfig], None] = lambda i, config: None,
        refill: Refill | None = None,
        on_outcome: Callable[[int, TrialOutcome], None] | None = None,
    ) -> list[TrialOutcome]:
        """Score several proposals at once, as one population where they share a shape
        (:func:`~attn_search.engine.trainer.evaluate_many`); ``i`` in the callbacks indexes
        ``members`` and then the refills. ``on_rungs([(i, step, accuracy, compute), ...])`` gets the
        rungs reached together in one call and returns a stop flag for each. ``refill()`` gives the
        next proposal ``(number, values)`` for a freed slot (training only; its ``i`` is the next
        index), and ``on_outcome(i, outcome)`` hears each member's outcome as soon as it ends.
        Returns one outcome per member (refills included), in order; as :meth:`run`, never raises
        for the trials' own failures."""
        attrs: list[dict[str, Any]] = [{} for _ in members]
        outcomes: list[TrialOutcome | None] = [None] * len(members)

        def put(i: int, key: str, value: Any) -> None:
            attrs[i][key] = value
            on_attr(i, key, value)

        def done(i: int, outcome: TrialOutcome) -> None:
            outcomes[i] = outcome
            if on_outcome is not None:
                on_outcome(i, outcome)

        def configure(i: int, values: dict[str, Any]) -> AttentionConfig | None:
            try:
                config = self.space.make_config(values, seed=self.seed)
            except ValueError as exc:
                put(i, "reason", f"invalid configuration: {exc}")
                put(i, "state", M.FAILED)
                done(i, TrialOutcome(M.FAILED, attrs[i]))
                return None
            put(i, "config", config.to_dict())
            on_start(i, config)
            return config

        configs: dict[int, AttentionConfig] = {}
        for i, values in enumerate(members):
            config = configure(i, values)
            if config is not None:
                configs[i] = config

        def next_config() -> tuple[int, AttentionConfig] | None:
            while refill is not None:
                proposal = refill()
                if proposal is None:
                    return None
                attrs.append({})
                outcomes.append(None)
                i = len(attrs) - 1
                config = configure(i, proposal[1])
                if config is not None:
                    configs[i] = config
                    return i, config
            return None

        if self.evaluator != "training":  # recorded (or a user's own) results instead of training
            for i, config in configs.items():
                try:
                    done(i, self._look_up(config, members[i], attrs[i], functools.partial(put, i)))
                except Exception as exc:
                    done(i, _failed(exc, attrs[i], functools.partial(put, i)))
        elif configs:
            try:
                self._train(configs, attrs, outcomes, put, on_rungs, done, next_config)
            except Exception as exc:
                for i in configs:
                    if outcomes[i] is None:
                        done(i, _failed(exc, attrs[i], functools.partial(put, i)))
        return [o if o is not None else TrialOutcome(M.FAILED, a) for o, a in zip(outcomes, attrs, strict=True)]

    def _look_up(
        self, config: AttentionConfig, values: dict[str, Any], attrs: dict[str, Any], put: Callable[[str, Any], None]
    ) -> TrialOutcome:
        if self._lookup is None:
            self._lookup = make_evaluator(self.evaluator, self.space)
        started = time.perf_counter()
        found = self._lookup(config, values)
        if found is None:
            put("reason", "the evaluator has no result for this configuration")
            put("state", M.FAILED)
            return TrialOutcome(M.FAILED, attrs)
        found = {**found, M.WALL_SECONDS: time.perf_counter() - started}
        for key, value in (("metrics", found), ("state", M.COMPLETE), ("device", "table")):
            put(key, value)
        return self._finish(attrs, found, M.COMPLETE)

    def _train(
        self,
        configs: dict[int, AttentionConfig],
        attrs: list[dict[str, Any]],
        outcomes: list[TrialOutcome | None],
        put: Callable[[int, str, Any], None],
        on_rungs: OnRungs,
        done: Callable[[int, TrialOutcome], None],
        next_config: Callable[[], tuple[int, AttentionConfig] | None] = lambda: None,
    ) -> None:
        ids = list(configs)  # member j of the population is proposal ids[j]; refills append
        compute: dict[int, dict[str, float]] = {}
        curves: dict[int, list[tuple[int, float]]] = {}

        def on_compute(j: int, figures: dict[str, float]) -> None:
            compute[ids[j]] = dict(figures)
            put(ids[j], "compute", figures)

        def report_rungs(rungs: Sequence[tuple[int, int, float]]) -> list[bool]:
            for j, step, accuracy in rungs:
                curves.setdefault(ids[j], []).append((step, accuracy))
                put(ids[j], "curve", list(curves[ids[j]]))
            stops = on_rungs(
                [(ids[j], step, acc, compute.get(ids[j], {})) for j, step, acc in rungs]
            )  # the rule records every rung
            # stopping after the last step would only discard it
            return [bool(stop) and step < self.budget.steps for stop, (_, step, _) in zip(stops, rungs, strict=True)]

        def refill() -> AttentionConfig | None:
            found = next_config()
            if found is None:
                return None
            ids.append(found[0])
            return found[1]

        def on_result(j: int, result: TrialResult) -> None:
            i = ids[j]
            if result.state == M.PRUNED and result.curve:
                result.reason = f"stopped early at step {result.curve[-1][0]}"
            ran = int(result.metrics.get(M.STEPS, budget.steps) or 0)
            if result.state == M.COMPLETE and ran < self.budget.steps:
                # cut short by the search's time budget: its accuracy is not the budget's, so it must
                # not sit on the front as if it were; it keeps its metrics and says why
                result.state = M.PRUNED
                result.reason = f"{CUT_SHORT} at step {ran} of {self.budget.steps}"
            for key, value in (("metrics", result.metrics), ("state", result.state), ("device", result.device),
                               ("task", result.task)):  # fmt: skip
                put(i, key, value)
            if result.reason:
                put(i, "reason", result.reason)
            done(i, self._finish(attrs[i], result.metrics, result.state))

        budget = self.budget
        if self.deadline is not None:  # the last trials stop training at the deadline, then evaluate
            budget = dataclasses.replace(budget, time_limit_s=max(5.0, self.deadline - time.time()))
        try:
            evaluate_many(
                list(configs.values()), self.task, budget=budget, device=self.device, report_rungs=report_rungs,
                task_kwargs=self.task_kwargs, on_compute=on_compute, refill=refill, on_result=on_result,
                heads=self.space.head_range(),
            )  # fmt: skip
        except Exception as exc:
            left = [i for i in ids if outcomes[i] is None]
            if len(ids) == 1:
                raise
            # one member's error must not fail its companions: each that had not ended trains again
            # alone, and only the ones that raise again fail (with their own error). The population's
            # error travels with the first of them (the loop writes it to errors.log and says so on
            # the console): a fallback is never silent, since on a GPU it costs most of the speed.
            error = error_attrs(exc)
            if left:
                put(left[0], "population_error", {"reason": error["reason"], "traceback": error["traceback"],
                                                  "members": len(ids)})  # fmt: skip
            _free_device_memory()
            for i in left:
                curves.pop(i, None)
                compute.pop(i, None)
                try:
                    self._train({i: configs[i]}, attrs, outcomes, put, on_rungs, done)
                except Exception as exc:
                    done(i, _failed(exc, attrs[i], functools.partial(put, i)))

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
