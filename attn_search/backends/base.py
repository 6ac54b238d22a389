"""What every backend shares: the job it is given, the events it gives back, the scoring of one
proposal (:class:`TrialRunner`), and the :class:`Backend` interface the search loop drives.

A backend decides *where* a trial runs (this process, a Ray worker on some node). It never decides
what to propose, whether to stop a trial early or what to record: the loop hands it jobs, answers
its rung reports through ``on_rung`` (the early-stopping rule) and records what it returns.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any, Protocol

import torch

from attn_search.engine import metrics as M
from attn_search.engine.config import AttentionConfig
from attn_search.engine.trainer import Budget, evaluate
from attn_search.evaluators import Evaluator, make_evaluator
from attn_search.failures import error_attrs
from attn_search.space import SearchSpace

OnRung = Callable[[int, int, float, dict[str, float]], bool]
"""``on_rung(number, step, accuracy, compute)``: the loop's early-stopping rule; ``True`` stops
the trial. Backends call it while the trial runs (from any thread)."""
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
    :meth:`capacity` / :meth:`submit` / :meth:`wait`, then :meth:`close`."""

    name: str

    def start(self, runner: TrialRunner, *, on_rung: OnRung, on_start: OnStart) -> None:
        """Get ready to run trials with ``runner`` (connect to a cluster, restore an experiment)."""

    def slots(self) -> int:
        """How many trials can run at once (the agent acts in this many environments)."""

    def capacity(self) -> int:
        """How many more jobs it takes now."""

    def submit(self, job: Job) -> None:
        """Run ``job`` (now or as soon as a worker is free)."""

    def wait(self, timeout: float) -> list[Event]:
        """Events since the last call; waits up to ``timeout`` seconds for one. The local backend
        runs its job here, in this thread."""

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
    """``training``, ``table:PATH`` or ``module:callable`` (see :func:`attn_search.evaluators.make_evaluator`)."""
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
        attribute holds the rest (:func:`attn_search.failures.error_attrs`)."""
        attrs: dict[str, Any] = {}

        def put(key: str, value: Any) -> None:
            attrs[key] = value
            on_attr(key, value)

        try:
            return self._run(values, attrs, put, on_rung, on_start)
        except Exception as exc:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # an out-of-memory trial must not starve the next one
            for key, value in error_attrs(exc).items():
                put(key, value)
            return TrialOutcome(M.FAILED, attrs)

    def _run(
        self,
        values: dict[str, Any],
        attrs: dict[str, Any],
        put: Callable[[str, Any], None],
        on_rung: Callable[[int, float, dict[str, float]], bool],
        on_start: Callable[[AttentionConfig], None],
    ) -> TrialOutcome:
        try:
            config = self.space.make_config(values, seed=self.seed)
        except ValueError as exc:
            put("reason", f"invalid configuration: {exc}")
            put("state", M.FAILED)
            return TrialOutcome(M.FAILED, attrs)
        put("config", config.to_dict())
        on_start(config)
        if self.evaluator != "training":  # recorded (or a user's own) results instead of training
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
        compute: dict[str, float] = {}
        curve: list[tuple[int, float]] = []

        def on_compute(figures: dict[str, float]) -> None:
            compute.update(figures)
            put("compute", figures)

        def reporter(step: int, accuracy: float) -> bool:
            curve.append((step, accuracy))
            put("curve", list(curve))
            stop = on_rung(step, accuracy, compute)  # the rule still records the last rung
            return stop and step < self.budget.steps  # stopping after the last step would only discard it

        budget = self.budget
        if self.deadline is not None:  # the last trial stops training at the deadline, then evaluates
            budget = dataclasses.replace(budget, time_limit_s=max(5.0, self.deadline - time.time()))
        result = evaluate(
            config, self.task, budget=budget, device=self.device, reporter=reporter,
            task_kwargs=self.task_kwargs, on_compute=on_compute,
        )  # fmt: skip
        if result.state == M.PRUNED and result.curve:
            result.reason = f"stopped early at step {result.curve[-1][0]}"
        for key, value in (("metrics", result.metrics), ("state", result.state), ("device", result.device),
                           ("task", result.task)):  # fmt: skip
            put(key, value)
        if result.reason:
            put("reason", result.reason)
        return self._finish(attrs, result.metrics, result.state)

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
