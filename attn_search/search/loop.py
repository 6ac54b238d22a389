"""The search: one loop that wires a space, a strategy, a backend and the run dir.

The three layers never blur. The *evaluator* scores a configuration (:mod:`attn_search.engine`,
:mod:`attn_search.search.evaluators`); the *strategy* chooses the next one (:mod:`attn_search.strategies`:
Optuna samplers or the RL agent, as ask and tell); the *backend* decides where a trial runs
(:mod:`attn_search.backends`: this process, or Ray Tune). :class:`SearchLoop` drives any strategy
on any backend the same way: it asks the strategy for as many proposals as the backend has free
slots, submits them, and answers the backend's events (:mod:`attn_search.backends.base`): a rung
with the early-stopping rule (a stop command), a vacant population seat with the strategy's next
proposal (an admit command), a finished trial by recording it in the run's Optuna study (the
record of the run, whoever proposed), telling the strategy, and handing it to the outputs (:mod:`attn_search.report.outputs`, :mod:`attn_search.report.progress`). Budget,
recording and the failure policy (:mod:`attn_search.search.failures`) live here and nowhere else.

Every finished trial is in the study the moment it ends, and ``trials.csv``/``pareto.csv`` are
rewritten after each one, so a crash or ``kill -9`` loses no finished trial. ``--resume`` marks
the trials a dead process left RUNNING as interrupted and runs their configurations again first.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import socket
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import optuna

from attn_search.backends import (
    BACKENDS,
    AtRung,
    Backend,
    Finished,
    Job,
    Note,
    Started,
    TrialRunner,
    Vacant,
    make_backend,
)
from attn_search.backends.base import CUT_SHORT, Event
from attn_search.engine import metrics as M
from attn_search.engine.config import AttentionConfig
from attn_search.engine.patterns import FLEX_BLOCK
from attn_search.errors import SearchAborted, UsageError
from attn_search.report.outputs import RunOutputs, SearchSummary
from attn_search.report.progress import Progress
from attn_search.search.evaluators import make_evaluator
from attn_search.search.failures import ERROR_LOG, FailurePolicy, log_error
from attn_search.search.plan import (
    DEFAULT_POPULATION,
    HEARTBEAT_S,
    PRUNERS,
    SEARCH_PRESETS,
    RunPlan,
    SearchOptions,
    make_plan,
    open_storage,
    study_name_for,
)
from attn_search.search.pruning import MOASHA
from attn_search.search.rundir import RUN_FILE, RunLock, RunRecord
from attn_search.search.space import SearchSpace
from attn_search.strategies import STRATEGIES, Strategy, StrategyContext, make_strategy
from attn_search.strategies.base import Outcome, ask_new, compute_key, outcome_of

__all__ = [
    "BACKENDS",
    "PRUNERS",
    "SEARCH_PRESETS",
    "STRATEGIES",
    "SearchLoop",
    "SearchOptions",
    "SearchSummary",
    "UsageError",
    "run_search",
]


# -- entry point -------------------------------------------------------------------------------------
def run_search(opts: SearchOptions, *, stream: TextIO | None = None) -> SearchSummary:
    """Run (or resume) a search; returns its summary.

    Raises :class:`UsageError` on bad input, before the run dir exists (or, for a run dir this call
    created, after removing it again), and :class:`~attn_search.errors.SearchAborted` when the
    first trials all failed the same way (see :mod:`attn_search.search.failures`).
    """
    plan = make_plan(opts)  # every option checked once: from here on, only the plan is read
    out = plan.out
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--out {out}: cannot create it ({exc.strerror})") from exc
    try:
        with RunLock(out):
            return _run_locked(plan, stream or sys.stdout)
    except UsageError:
        if created and not (out / "trials.csv").exists():  # refused before any trial: leave nothing behind
            shutil.rmtree(out, ignore_errors=True)
        raise


def _hypervolume_bounds(plan: RunPlan) -> dict:
    """The fixed compute ranges of the run's hypervolume (:data:`attn_search.report.outputs.HYPERVOLUME_DEFINITION`)."""
    space = plan.space
    evaluator = make_evaluator(plan.evaluator, space, task=plan.task, task_kwargs=plan.task_kwargs)
    grids = evaluator.grids(space, 5)
    bounds: dict[str, list[float] | None] = {}
    for metric in space.metrics[1:]:
        try:
            bounds[metric] = list(evaluator.bounds(space, metric, grids))
        except ValueError:
            bounds[metric] = None  # measured (latency, memory): 0 to the largest value seen
    return bounds


def _run_locked(plan: RunPlan, stream: TextIO) -> SearchSummary:
    out, space = plan.out, plan.space
    if plan.resume:
        record = RunRecord.read(out)
        if record.space_fingerprint != space.fingerprint():
            raise UsageError(
                f"--resume: {out} was searched over space {record.space!r} ({record.space_fingerprint}); "
                f"--space {plan.space_spec!r} with --compute {plan.compute} is a different space "
                f"({space.fingerprint()})"
            )
    elif (out / RUN_FILE).exists():  # another search created it between our check and the lock
        raise UsageError(f"--out {out} already holds a run: add --resume to continue it, or choose another --out")
    else:
        options = {k: v for k, v in dataclasses.asdict(plan.options).items() if k != "enqueue"}
        record = RunRecord(space=plan.space_spec, space_fingerprint=space.fingerprint(), created=time.time(),
                           options=options, task=plan.task, task_params=plan.task_kwargs,
                           study_name=plan.study_name or study_name_for(out),
                           hypervolume_bounds=_hypervolume_bounds(plan),
                           budget=dataclasses.asdict(plan.budget), space_definition=space.to_dict())  # fmt: skip
        record.write(out)
    storage = plan.storage or open_storage(f"sqlite:///{(out / 'study.db').resolve()}")
    backend = make_backend(plan.backend, run_dir=out, resume=plan.resume, options=plan.backend_options)
    runner = TrialRunner(space=space, budget=plan.budget, task=plan.task, task_kwargs=plan.task_kwargs, seed=plan.seed,
                         device=plan.device, max_flops=plan.max_flops, max_latency_ms=plan.max_latency_ms,
                         evaluator=plan.evaluator)  # fmt: skip
    outputs = RunOutputs.from_record(out, record, space)
    progress = Progress(stream, quiet=plan.quiet, total=plan.trials,
                        compute_metric=space.metrics[1] if len(space.metrics) > 1 else M.FLOPS)  # fmt: skip
    loop = SearchLoop(plan, runner=runner, backend=backend, outputs=outputs, progress=progress, storage=storage,
                      study_name=record.study_name)  # fmt: skip
    return loop.run()


_COMPUTE_WORDS = {M.FLOPS: "the whole model's analytic forward FLOPs", M.ATTN_FLOPS: "the attention's analytic FLOPs",
                  M.ATTN_TILE_FLOPS: "the attention's analytic FLOPs over the 128-tiles FlexAttention computes",
                  M.LATENCY_MS: "measured forward latency", M.PEAK_MEM_MB: "measured peak memory",
                  M.PARAMS: "parameters"}  # fmt: skip


def compute_line(space: SearchSpace, task_len: int | None) -> str:
    """``compute: attn_flops (the attention's analytic FLOPs) at L=4096, ...``: what the front's
    compute axis counts and at which length (the search's first lines say it)."""
    metric = space.metrics[1]
    where = (f"at L={space.target_len}, the target length; accuracy trains at the task's L={task_len}"
             if space.target_len and space.target_len != task_len else f"at the task's length L={task_len}")  # fmt: skip
    return f"compute: {metric} ({_COMPUTE_WORDS.get(metric, metric)}) {where} (--compute, --target-len change it)"


def tile_hint(space: SearchSpace, device_kind: str, task_len: int | None) -> str | None:
    """What a search should know about tiles: where trials train on CUDA, the space searches the
    pattern and compute counts kept entries (``attn_flops``; ``flops`` where width and depth are
    fixed), the metric that counts what the exported layer computes there; where compute counts
    tiles at a length of one tile or less, that it is flat."""
    if len(space.metrics) < 2:
        return None
    metric, length = space.metrics[1], space.target_len or task_len
    if metric == M.ATTN_TILE_FLOPS and length is not None and length <= FLEX_BLOCK:
        return (f"(at L={length} every pattern computes the same single {FLEX_BLOCK}-tile, so compute does not "
                "separate configurations: --compute attn_flops counts the entries each keeps)")  # fmt: skip
    searched = {p.name for p in space.params}  # (where width or depth vary, flops count them too: keep flops)
    if (
        device_kind == "cuda"
        and "pattern" in searched
        and (metric == M.ATTN_FLOPS or (metric == M.FLOPS and space.fixed_size))
    ):
        return ("(on CUDA the exported layer computes whole 128-tiles, which a pattern's kept entries do not count: "
                "--compute attn_tile_flops counts them)")  # fmt: skip
    return None


# -- the loop ------------------------------------------------------------------------------------------
class _Rule:
    """The early-stopping rule, one for every backend: MO-ASHA with two objectives, Optuna's
    successive halving or median pruner with one (through the live trial), or none."""

    def __init__(self, name: str, space: SearchSpace, moasha: MOASHA) -> None:
        self.name, self.space, self.moasha = name, space, moasha

    def stop(self, trial: optuna.Trial, step: int, accuracy: float, compute: dict[str, float]) -> bool:
        if self.name == "moasha":
            point = [accuracy, *(compute.get(m, math.nan) for m in self.space.metrics[1:])]
            return not self.moasha.report(trial.number, step, point)
        if self.name in ("asha", "median"):
            trial.report(accuracy, step)
            return bool(trial.should_prune())
        return False


class SearchLoop:
    """Drives one strategy on one backend until the trial or time budget is spent (see the module
    docstring). Its lock guards the live trials against the heartbeat thread."""

    def __init__(
        self, plan: RunPlan, *, runner: TrialRunner, backend: Backend, outputs: RunOutputs, progress: Progress,
        storage: optuna.storages.BaseStorage, study_name: str,
        strategy: Callable[[StrategyContext], Strategy] | None = None,
        key: Callable[[dict[str, Any]], tuple[Any, ...]] | None = None,
    ) -> None:  # fmt: skip
        """``strategy``: builds the run's strategy (default: ``plan.strategy`` by name); ``key``:
        what makes two proposals one trial, from their active values (default: the same values, or
        masks identical at the lengths that count, :func:`~attn_search.strategies.base.compute_key`)."""
        self.plan, self.space, self.runner, self.backend = plan, plan.space, runner, backend
        self.outputs, self.progress, self.storage, self.study_name = outputs, progress, storage, study_name
        self.trials, self.time_budget = plan.trials, plan.time_budget
        self.population = plan.population or 1
        self._population_given = plan.population is not None
        self.owner = run_owner(outputs.run_dir)
        self.lock = threading.RLock()
        self.live: dict[int, optuna.Trial] = {}
        self.curves: dict[int, list[tuple[int, float]]] = {}
        self.trial_seconds = 0.0
        self.population_fallbacks = 0
        self.aborted: str | None = None
        self.deadline: float | None = None
        self.confirm = plan.confirm
        self._warned_latency = False
        self._slot: int | None = None  # the first trial of the population being filled
        self._make_strategy, self._same = strategy, key

    # -- set up --------------------------------------------------------------------------------
    def _study(self, strategy: Strategy) -> optuna.Study:
        plan, space = self.plan, self.space
        pruner_name = self.pruner_name
        optuna_pruner: optuna.pruners.BasePruner = {
            "asha": optuna.pruners.SuccessiveHalvingPruner(reduction_factor=int(plan.eta)),
            "median": optuna.pruners.MedianPruner(n_startup_trials=3),
        }.get(pruner_name, optuna.pruners.NopPruner())
        # ERROR: Optuna logs every failed trial with its traceback at WARNING; ours go to errors.log and
        # the progress line says why the trial failed
        optuna.logging.set_verbosity(optuna.logging.ERROR)
        try:
            study = optuna.create_study(
                storage=self.storage, study_name=self.study_name, directions=space.directions,  # type: ignore[arg-type]
                # every trial is opened with the values a strategy proposed (or --enqueue gave): the
                # study's sampler draws only what an --enqueue entry leaves out
                sampler=optuna.samplers.RandomSampler(seed=plan.seed), pruner=optuna_pruner, load_if_exists=plan.resume,
            )  # fmt: skip
        except optuna.exceptions.DuplicatedStudyError as exc:
            raise UsageError(
                f"--study-name {self.study_name!r} already exists in --storage: add --resume to continue that run, "
                "or choose another --study-name"
            ) from exc
        if not plan.resume:
            study.set_metric_names(list(space.metrics))  # optuna-dashboard shows "accuracy", "flops"
            for values in plan.enqueue:
                study.enqueue_trial(values)
        return study

    def _session_seed(self) -> int:
        """The strategy's seed: ``--seed`` for a new run; on ``--resume``, derived from it and the
        trials already run, so a resumed search does not draw the first session's proposals again."""
        if not self.plan.resume:
            return self.plan.seed
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            n = len(optuna.load_study(study_name=self.study_name, storage=self.storage).get_trials(deepcopy=False))
        return (self.plan.seed + 1_000_003 * n) % 2**31

    @property
    def pruner_name(self) -> str:
        return self.plan.pruner

    def run(self) -> SearchSummary:
        plan, space = self.plan, self.space
        start = time.perf_counter()
        self.deadline = None if self.time_budget is None else time.time() + self.time_budget
        self.runner.deadline = self.deadline  # the last trial stops training at the deadline
        rung_steps = self.runner.rung_steps()  # (a recorded table's, where trials are looked up)
        # no decision at the first rung (grace period): see attn_search.search.pruning
        moasha = MOASHA(space.directions, eta=plan.eta, grace_period=rung_steps[1] if len(rung_steps) > 1 else 0)
        self.rule = _Rule(self.pruner_name, space, moasha)
        self.backend.start(self.runner)
        if not self._population_given:
            self.population = (
                DEFAULT_POPULATION[self.backend.device_kind()] if self.runner.evaluator == "training" else 1
            )
        context = StrategyContext(space=space, seed=self._session_seed(), trials=self.trials,
                                  slots=self.backend.slots() * self.population,
                                  run_dir=self.outputs.run_dir, resume=plan.resume, evaluator=self.runner.evaluator,
                                  compute=plan.compute, options=plan.strategy_options, task=self.runner.task,
                                  task_kwargs=self.runner.task_kwargs)  # fmt: skip
        strategy = (
            self._make_strategy(context)
            if self._make_strategy is not None
            else make_strategy(plan.strategy, context, constrained=plan.constrained)
        )
        self.study = study = self._study(strategy)
        recovered = recover_interrupted(study, owner=self.owner)
        if self.rule.name == "moasha":
            _replay_rungs(study, moasha, space)
        trials = study.get_trials(deepcopy=False)
        self.seen = {self._key_of(t.params): t.number for t in trials if _counts(t)}
        self.policy = FailurePolicy(armed=not any(_got_through(t) for t in trials))
        self.finished = count_finished(study)
        self.progress.start(done=self.finished, remaining=max(0, self.trials - self.finished),
                            out=self.outputs.run_dir, recovered=recovered)  # fmt: skip
        self.progress.open()
        if self.population > 1:
            how = "--population" if self._population_given else f"the default on {self.backend.device_kind()}"
            self.progress.note(f"  populations: up to {self.population} trials train together per slot ({how}; "
                               "--population 1 trains one at a time)")  # fmt: skip
        if len(space.metrics) > 1:
            self.progress.note("  " + compute_line(space, self.outputs.task_len()))
            if self.plan.compute_note:
                self.progress.note("  " + self.plan.compute_note)
            device = self.backend.device_kind() if self.runner.evaluator == "training" else "cpu"
            hint = tile_hint(space, device, self.outputs.task_len())
            if hint:
                self.progress.note("  " + hint)
        if self.confirm > 0:
            self.progress.note(f"  then the front is confirmed: each point trained again with {self.confirm} more "
                               "seed(s), its accuracy the mean (--confirm 0 skips this)")  # fmt: skip
        note = strategy.start(self._history(study))
        if note:
            self.progress.note(note)
        heartbeat = threading.Thread(target=self._heartbeat, name="heartbeat", daemon=True)
        self._beating = threading.Event()
        heartbeat.start()
        interrupted = False
        try:
            self._drive(strategy)
        except KeyboardInterrupt:
            interrupted = True  # the running trials stay RUNNING: --resume runs them again
        finally:
            self._beating.set()
            self.backend.close()
            strategy.close()
            self.progress.close()
        wall = time.perf_counter() - start
        self.outputs.write_all(study, wall_seconds=wall, trial_seconds=self.trial_seconds, options=plan.options)
        stopped_by = self._stopped_by()
        if interrupted:
            raise KeyboardInterrupt
        if self.aborted is not None:
            raise SearchAborted(f"{self.aborted} (tracebacks in {self.outputs.run_dir / ERROR_LOG})")
        if self.confirm > 0:  # (a kill here loses no retrain: --resume runs no trial and continues it)
            from attn_search.confirm import confirm_seeds

            confirm_seeds(self.outputs.run_dir, seeds=self.confirm, device=plan.device,
                          say=lambda text: self.progress.note(text))  # fmt: skip
        if plan.evaluator == "training" and plan.attention_picture:  # (real training: a model to look inside)
            from attn_search.report.attention_map import draw_attention

            draw_attention(self.outputs.run_dir, device=plan.device, say=lambda text: self.progress.note(text))
        summary = self.outputs.summary(study, wall_seconds=wall, trial_seconds=self.trial_seconds)
        summary.stopped_by = stopped_by
        self.progress.finish(summary)
        return summary

    def _history(self, study: optuna.Study) -> list[tuple[dict[str, Any], Outcome]]:
        """What a resumed search already knows, as a strategy is told it: every finished trial, a
        repeat told its original's outcome."""
        trials = study.get_trials(deepcopy=False)
        out = []
        for t in trials:
            if not t.state.is_finished():
                continue
            original = t.user_attrs.get("duplicate_of")
            outcome = (
                outcome_of(t)
                if original is None
                else dataclasses.replace(outcome_of(trials[original]), duplicate_of=original)
            )
            out.append((self.space.active_values(dict(t.params)), outcome))
        return out

    def _stopped_by(self) -> str:
        """Why the search ended (the console's last word on it)."""
        if self.finished >= self.trials:
            return f"all {self.trials} trials ran"
        if self.deadline is not None and time.time() >= self.deadline:
            return (f"the time budget of {self.time_budget:g} s ran out after {self.finished} of {self.trials} trials "
                    "(raise --time-budget or give --trials to run them all)")  # fmt: skip
        return f"{self.finished} of {self.trials} trials ran"

    def _asking(self) -> bool:
        if self.aborted is not None or self.finished + len(self.live) >= self.trials:
            return False
        return self.deadline is None or time.time() < self.deadline

    def _drive(self, strategy: Strategy) -> None:
        while True:
            while self.backend.capacity() > 0 and self._asking():
                jobs: list[Job] = []
                with self.lock:  # a slot: up to `population` proposals, trained together
                    self._slot = None
                    while len(jobs) < self.population:
                        job = self._ask_job(strategy)
                        if job is None:
                            break
                        jobs.append(job)
                if not jobs:
                    break
                self.backend.submit(jobs)
            if not self.live and self.backend.capacity() >= self.backend.slots():
                # nothing running and nothing more to run (a Ray population whose members all ended
                # keeps its slot until Tune says its trial ended)
                return
            self._answer(self.backend.wait(timeout=1.0), strategy)

    def _ask_job(self, strategy: Strategy, slot: int | None = None) -> Job | None:
        """The next proposal as a job, live from now on; ``None`` when the budget allows no more.
        Also the answer to a vacant seat of the population whose first trial is ``slot``."""
        with self.lock:
            if not self._asking():
                return None
            trial = self._next(strategy)
            if trial is None:
                return None
            trial.set_user_attr("owner", self.owner)  # see recover_interrupted
            if slot is None:
                if self._slot is None:
                    self._slot = trial.number
                slot = self._slot
            trial.set_user_attr("slot", slot)  # trials.csv's `slot`: the population it trained in
            self.live[trial.number] = trial
            return Job(trial.number, self._values(trial))

    def _answer(self, events: list[Event], strategy: Strategy) -> None:
        """The loop's side of the event protocol: it records, decides and commands; backends only
        carry (see :mod:`attn_search.backends.base`)."""
        refilling = True  # a vacant seat the strategy had nothing for: no more asks this round
        for event in events:
            if isinstance(event, Note):
                self.progress.note(event.text)
            elif isinstance(event, Started):
                self.on_start(event.number, event.config)
            elif isinstance(event, AtRung):
                if self.on_rung(event.number, event.step, event.accuracy, event.compute):
                    self.backend.stop(event.number)
            elif isinstance(event, Finished):
                self._record(event, strategy)
                refilling = True  # (what it was told may give the strategy a proposal again)
            elif isinstance(event, Vacant) and refilling:
                job = self._ask_job(strategy, event.population)
                if job is None:
                    refilling = False
                else:
                    self.backend.admit(event.population, event.index, job)

    def _next(self, strategy: Strategy) -> optuna.Trial | None:
        """Waiting trials first (interrupted trials run again, ``--enqueue``), then the strategy's
        next proposal that repeats no earlier trial (:func:`~attn_search.strategies.base.ask_new`)."""
        if self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)):
            waiting = (
                self.study.ask()
            )  # (asked for by name: runs even where it repeats a trial, as a table's grid does)
            self.space.suggest(waiting)
            self.seen.setdefault(self._key(waiting), waiting.number)
            return waiting
        return ask_new(strategy, self.study, self.space, self.seen, key=self._key_of)

    def _key(self, trial: optuna.Trial) -> tuple[Any, ...]:
        return self._key_of(dict(trial.params))

    def _key_of(self, params: dict[str, Any]) -> tuple[Any, ...]:
        """What makes two proposals one trial: the same active values, or masks identical at the
        lengths that count (the task's, and the target length), as BigBird(32, 4, 3) and dense
        are at L=256 (:func:`~attn_search.strategies.base.compute_key`)."""
        if self._same is not None:
            return self._same(self.space.active_values(params))
        lengths = [L for L in (self.outputs.task_len(), self.space.target_len) if L]
        return compute_key(self.space, self.space.active_values(params), lengths)

    def _values(self, trial: optuna.Trial) -> dict[str, Any]:
        return self.space.active_values(dict(trial.params))

    # -- the events ---------------------------------------------------------------------------------
    def on_start(self, number: int, config: AttentionConfig) -> None:
        with self.lock:
            trial = self.live.get(number)
            if trial is not None:
                trial.set_user_attr("config", config.to_dict())  # an interrupted trial keeps it
        self.progress.trial_started(number, config.describe())

    def on_rung(self, number: int, step: int, accuracy: float, compute: dict[str, float]) -> bool:
        with self.lock:
            trial = self.live.get(number)
            if trial is None:
                return False
            # (a retried Ray trial says its rungs again: the retry's replace the first try's)
            curve = self.curves[number] = [p for p in self.curves.get(number, []) if p[0] < step]
            curve.append((step, accuracy))
            trial.set_user_attr("curve", list(curve))  # an interrupted trial keeps them
            if len(curve) == 1:
                trial.set_user_attr("compute", dict(compute))
            stop = self.rule.stop(trial, step, accuracy, compute)
        self.progress.rung(number, step, accuracy)
        return stop

    def _heartbeat(self) -> None:
        """Optuna records heartbeats only inside ``study.optimize``; this loop asks and tells, so it
        records them itself for every running trial."""
        record = getattr(self.storage, "record_heartbeat", None)
        while record is not None and not self._beating.wait(HEARTBEAT_S):
            with self.lock:
                for trial in list(self.live.values()):
                    record(trial._trial_id)

    # -- recording ---------------------------------------------------------------------------------
    def _record(self, event: Finished, strategy: Strategy) -> None:
        with self.lock:
            trial = self.live.pop(event.number, None)
            self.curves.pop(event.number, None)
            if trial is None:
                return  # a trial of an earlier session (a restored Ray experiment)
            attrs = dict(event.outcome.attrs)
            state = event.outcome.state
            if "traceback" in attrs:
                log_error(self.outputs.run_dir, trial.number, attrs)
                del attrs["traceback"]
            fallback = attrs.pop("population_error", None)
            if fallback is not None:
                self._population_fell_back(trial.number, fallback)
            if state == M.PRUNED and not str(attrs.get("reason", "")).startswith(CUT_SHORT):
                attrs["reason"] = f"pruned by {self.rule.name} at step {attrs.get('curve', [[0]])[-1][0]}"
            attrs.setdefault("node", socket.gethostname())
            attrs["backend"] = self.backend.name
            for key, value in attrs.items():
                if key != "constraints":
                    trial.set_user_attr(key, value)
            for key, value in attrs.get("constraints", {}).items():
                trial.set_constraint(key, value)  # Optuna 5: read by TPE, NSGA-II and GP
            metrics = attrs.get("metrics")
            if state == M.COMPLETE and event.outcome.values is not None:
                self.study.tell(trial, list(event.outcome.values))
            else:
                self.study.tell(trial, state=optuna.trial.TrialState.PRUNED if state == M.PRUNED
                                else optuna.trial.TrialState.FAIL)  # fmt: skip
            self.finished += 1
            self.trial_seconds += float((metrics or {}).get(M.WALL_SECONDS, 0.0) or 0.0)
            told = Outcome(state, metrics, tuple(event.outcome.values) if state == M.COMPLETE and event.outcome.values
                           is not None else None, dict(attrs.get("constraints", {})),
                           tuple((int(s), float(a)) for s, a in attrs.get("curve", [])))  # fmt: skip
            strategy.tell(self._values(trial), told)
            df = self.outputs.write_tables(self.study)  # the trials table is built once per trial
            stats = self.outputs.stats(self.study, df)
            label = AttentionConfig.from_dict(attrs["config"]).describe() if "config" in attrs else ""
            self.progress.trial_done(trial.number, state, metrics or {}, label, stats)
            self._check_latency(trial.number, metrics or {})
            message = self.policy.observe(state, attrs)
            if message is not None and self.aborted is None:
                self.aborted = message

    def _check_latency(self, number: int, metrics: dict[str, Any]) -> None:
        """One console line, the first time a trial's timed runs varied too much to trust its latency
        (the report lists every such trial)."""
        spread = float(metrics.get(M.LATENCY_SPREAD, 1.0) or 1.0)
        if spread > M.LATENCY_SPREAD_WARN and not self._warned_latency:
            self._warned_latency = True
            self.progress.note(f"  warning: trial {number}'s timed forward passes varied {spread:.1f}x (slowest over "
                               "fastest): something else loaded the machine, so latency_ms figures are unreliable "
                               "(trials.csv: latency_spread; the report lists such trials)")  # fmt: skip

    def _population_fell_back(self, number: int, error: dict[str, Any]) -> None:
        """A population raised and its members retrained one at a time: errors.log gets why, the
        console one line per search, and ``run.json``'s readers the count (``population_fallbacks``)."""
        reason = (
            f"population of {error.get('members')} (slot {number}) raised, members retrained alone: {error['reason']}"
        )
        log_error(self.outputs.run_dir, f"{number} (population)", {"reason": reason, "traceback": error["traceback"]})
        self.population_fallbacks += 1
        if self.population_fallbacks == 1:
            self.progress.note(f"  warning: {reason} (traceback in {ERROR_LOG}; later fallbacks logged there only)")


# -- trials in storage -------------------------------------------------------------------------------
def run_owner(run_dir: Path) -> str:
    """The tag a run dir's trials carry (``owner``): host and run dir."""
    return f"{socket.gethostname()}:{run_dir.resolve()}"


def recover_interrupted(study: optuna.Study, *, owner: str) -> int:
    """Trials left RUNNING by a process that died: mark them failed (``interrupted``) and enqueue
    their parameters so they run again. Returns how many were recovered.

    Called with the run dir's lock held (:class:`~attn_search.search.rundir.RunLock`), which proves that
    no process runs this run dir any more: its own trials (``owner``) are dead. A RUNNING trial of
    another owner (a process sharing the storage) is dead only once its heartbeat is stale."""
    storage = study._storage  # Optuna exposes no public setter for another trial's state
    stale: set[int] = set()
    if getattr(storage, "get_heartbeat_interval", lambda: None)() is not None:
        # Optuna's own fail_stale_trials would fail them too, but leave no mark and enqueue nothing
        stale = set(storage._get_stale_trial_ids(study._study_id))  # type: ignore[attr-defined]
    recovered = 0
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if t.user_attrs.get("owner", owner) != owner and t._trial_id not in stale:
            continue  # alive in another process
        storage.set_trial_user_attr(t._trial_id, "interrupted", True)
        storage.set_trial_user_attr(t._trial_id, "reason", "interrupted: the search process died during this trial")
        storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
        study.enqueue_trial(t.params, user_attrs={"retry_of": t.number}, skip_if_exists=False)
        recovered += 1
    return recovered


def _got_through(t: optuna.trial.FrozenTrial) -> bool:
    """A finished trial that shows the setup works (disarms the failure policy on resume)."""
    if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED):
        return True
    return t.state == optuna.trial.TrialState.FAIL and "error" not in t.user_attrs and "metrics" in t.user_attrs


def _counts(t: optuna.trial.FrozenTrial) -> bool:
    """A trial that counts towards ``--trials``: complete, pruned, or failed on its own (not an
    interrupted one, which runs again, nor a duplicate proposal, which never ran)."""
    if "duplicate_of" in t.user_attrs:
        return False
    if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED):
        return True
    return t.state == optuna.trial.TrialState.FAIL and not t.user_attrs.get("interrupted")


def count_finished(study: optuna.Study) -> int:
    """Trials that count towards ``--trials`` (see :func:`_counts`)."""
    return sum(_counts(t) for t in study.get_trials(deepcopy=False))


def _replay_rungs(study: optuna.Study, moasha: MOASHA, space: SearchSpace) -> None:
    """Rebuild MO-ASHA's rung tables from the trials already in storage (resume)."""
    for t in study.get_trials(deepcopy=False):
        compute = t.user_attrs.get("compute")
        if not compute or t.user_attrs.get("interrupted"):
            continue
        for step, acc in t.user_attrs.get("curve", []):
            moasha.record(t.number, int(step), [acc, *(compute[m] for m in space.metrics[1:])])
