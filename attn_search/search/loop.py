"""The search: one loop that wires a space, a strategy, a backend and the run dir.

The three layers never blur. The *evaluator* scores a configuration (:mod:`attn_search.engine`,
:mod:`attn_search.search.evaluators`); the *strategy* chooses the next one (:mod:`attn_search.strategies`:
Optuna samplers or the RL agent, as ask and tell); the *backend* decides where a trial runs
(:mod:`attn_search.backends`: this process, or Ray Tune). :class:`SearchLoop` drives any strategy
on any backend the same way: it asks the strategy for as many proposals as the backend has free
slots, submits them, answers every rung with the early-stopping rule, records each finished trial
in the run's Optuna study (the record of the run, whoever proposed), tells the strategy, and
hands the trial to the outputs (:mod:`attn_search.report.outputs`, :mod:`attn_search.report.progress`). Budget,
recording and the failure policy (:mod:`attn_search.search.failures`) live here and nowhere else.

Every finished trial is in the study the moment it ends, and ``trials.csv``/``pareto.csv`` are
rewritten after each one, so a crash or ``kill -9`` loses no finished trial. ``--resume`` marks
the trials a dead process left RUNNING as interrupted and runs their configurations again first.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import math
import shutil
import socket
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any, TextIO

import optuna

from attn_search.backends import BACKENDS, Backend, Finished, Job, Note, TrialRunner, make_backend
from attn_search.backends.base import CUT_SHORT, Event
from attn_search.engine import metrics as M
from attn_search.engine.config import AttentionConfig
from attn_search.engine.tasks import check_task, make_task
from attn_search.engine.trainer import PRESETS, resolve_device
from attn_search.errors import SearchAborted, UsageError
from attn_search.report.outputs import RunOutputs, SearchSummary, parse_selection
from attn_search.report.progress import Progress
from attn_search.search.evaluators import make_evaluator, restrict_to_evaluator
from attn_search.search.failures import ERROR_LOG, FailurePolicy, describe, log_error
from attn_search.search.pruning import MOASHA
from attn_search.search.rundir import RUN_FILE, RunLock, RunRecord
from attn_search.search.space import SearchSpace, load_space
from attn_search.strategies import STRATEGIES, Strategy, StrategyContext, check_strategy, make_strategy
from attn_search.strategies.base import Outcome, ask_new, compute_key, outcome_of

PRUNERS = ("moasha", "asha", "median", "none")
HEARTBEAT_S = 10
"""Seconds between heartbeats of a running trial; one missed for :data:`GRACE_S` marks it dead."""
GRACE_S = 60

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


@dataclasses.dataclass(frozen=True)
class SearchPreset:
    """Trials, per-trial budget and wall-time cap of a ``--preset``."""

    trials: int
    budget: str
    time_budget: float | None
    confirm: int = 0
    """Extra seeds each front point is retrained with after the search (``--confirm``)."""


SEARCH_PRESETS = {
    "smoke": SearchPreset(trials=6, budget="smoke", time_budget=None),
    # 25-90 s trials on 2 CPU cores; the cap (which also cuts the last trial's training short)
    # keeps the search under 10 minutes, outputs included. Confirming the front with one more seed
    # adds about 20 s per front point (a front of 13 took 5 minutes on 2 cores; the seeds' accuracies
    # differed by at most 0.007 there, so one more seed shows a point that is not stable).
    "default": SearchPreset(trials=24, budget="default", time_budget=540.0, confirm=1),
    "full": SearchPreset(trials=100, budget="full", time_budget=None, confirm=2),
}


@dataclasses.dataclass
class SearchOptions:
    """What ``run_search.py`` accepts (one field per flag)."""

    space: str = "sparse"
    strategy: str = "tpe"
    backend: str = "local"
    address: str | None = None
    """``--backend ray``: ``auto`` or ``HOST:PORT`` of a running cluster (none: start Ray locally)."""
    cpus_per_trial: float = 1.0
    gpus_per_trial: float | None = None
    """``--backend ray``; none: 1 if the cluster has GPUs (and ``--device`` is not cpu), else 0."""
    max_concurrent: int | None = None
    """``--backend ray``: at most this many trials at once (none: as many as resources allow)."""
    population: int | None = None
    """Trials trained together in one slot (one fused model where shapes agree); none: the
    device's default (:data:`DEFAULT_POPULATION`)."""
    trials: int | None = None
    time_budget: float | None = None
    preset: str = "default"
    steps: int | None = None
    task: str | None = None
    task_params: dict[str, Any] | None = None
    """Keyword arguments of the task's constructor (``--task-param seq_len=128``); for the space's
    own task they override the space's ``task.params``."""
    out: str | None = None
    resume: bool = False
    seed: int = 0
    device: str = "auto"
    select: str = "knee"
    compute: str = "flops"
    max_flops: float | None = None
    max_latency_ms: float | None = None
    pruner: str | None = None
    eta: float = 3.0
    storage: str | None = None
    study_name: str | None = None
    """The study's name in ``--storage`` (default: derived from the run dir, so runs can share one)."""
    quiet: bool = False
    evaluator: str = "training"
    """``training`` (real training), ``table:PATH`` (a recorded table) or ``module:callable``."""
    pretrain: str | None = None
    pretrain_steps: int = 2000
    agent: str | None = None
    target_len: int | None = None
    """Report the compute objectives at this sequence length (overrides the space's ``target_len``)."""
    confirm: int | None = None
    """Retrain each front point with this many more seeds after the search (none: the preset's;
    only with real training)."""
    enqueue: list[dict[str, Any]] | None = None
    """Configurations (searched values) to evaluate first, in order (``attn-search record``)."""
    attention_picture: bool = False
    """After the search, train the chosen configuration once more and draw what it attends (the
    report's ``attention.png``; real training only). On by default on the command line
    (``--no-attention-picture``); off here, so a program's searches train nothing it did not ask for."""


# -- checks before anything exists ---------------------------------------------------------------
def _check(opts: SearchOptions) -> tuple[SearchSpace, SearchPreset]:
    if opts.evaluator.startswith("table:") and not Path(opts.evaluator[6:]).is_file():
        raise UsageError(f"--evaluator {opts.evaluator!r}: no such table")
    if opts.pretrain and not Path(opts.pretrain).is_file():
        raise UsageError(f"--pretrain {opts.pretrain!r}: no such table")
    if opts.backend not in BACKENDS:
        raise UsageError(f"--backend {opts.backend!r} is unknown: use one of {', '.join(BACKENDS)}")
    if opts.backend == "local":
        given = [flag for flag, value, default in (("--address", opts.address, None),
                 ("--cpus-per-trial", opts.cpus_per_trial, 1.0), ("--gpus-per-trial", opts.gpus_per_trial, None),
                 ("--max-concurrent", opts.max_concurrent, None)) if value != default]  # fmt: skip
        if given:
            raise UsageError(f"{', '.join(given)}: only with --backend ray (add --backend ray)")
    if opts.cpus_per_trial <= 0:
        raise UsageError(f"--cpus-per-trial {opts.cpus_per_trial} is invalid: it must be > 0")
    if opts.gpus_per_trial is not None and opts.gpus_per_trial < 0:
        raise UsageError(f"--gpus-per-trial {opts.gpus_per_trial} is invalid: it must be >= 0")
    if opts.max_concurrent is not None and opts.max_concurrent < 1:
        raise UsageError(f"--max-concurrent {opts.max_concurrent} is invalid: it must be at least 1")
    if opts.preset not in SEARCH_PRESETS:
        raise UsageError(f"--preset {opts.preset!r} is unknown: use one of {', '.join(SEARCH_PRESETS)}")
    if opts.compute not in (*M.COMPUTE_OBJECTIVES, "none"):
        raise UsageError(f"--compute {opts.compute!r} is unknown: use one of {', '.join(M.COMPUTE_OBJECTIVES)} or none")
    if opts.confirm is not None and opts.confirm < 0:
        raise UsageError(f"--confirm {opts.confirm} is invalid: give 0 (no confirmation) or more seeds")
    if opts.confirm and opts.evaluator != "training":
        raise UsageError(f"--confirm {opts.confirm}: needs --evaluator training (a table or your evaluator gives "
                         "one result per configuration)")  # fmt: skip
    for flag, count in (("--steps", opts.steps), ("--trials", opts.trials), ("--population", opts.population)):
        if count is not None and count < 1:
            raise UsageError(f"{flag} {count} is invalid: it must be at least 1")
    if opts.time_budget is not None and opts.time_budget <= 0:
        raise UsageError(f"--time-budget {opts.time_budget} is invalid: it must be > 0 seconds")
    if opts.pruner is not None and opts.pruner not in PRUNERS:
        raise UsageError(f"--pruner {opts.pruner!r} is unknown: use one of {', '.join(PRUNERS)}")
    if opts.eta <= 1:
        raise UsageError(f"--eta {opts.eta} is invalid: it must be > 1")
    for flag, value in (("--max-flops", opts.max_flops), ("--max-latency-ms", opts.max_latency_ms)):
        if value is not None and value <= 0:
            raise UsageError(f"{flag} {value} is invalid: it must be > 0")
    try:
        parse_selection(opts.select)
        space = load_space(opts.space)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    space = space.with_compute(None if opts.compute == "none" else opts.compute)
    if opts.target_len is not None:
        if opts.target_len < 1:
            raise UsageError(f"--target-len {opts.target_len} is invalid: it must be a sequence length >= 1")
        space = dataclasses.replace(space, target_len=opts.target_len)
    if opts.target_len is not None and opts.evaluator != "training":
        raise UsageError(f"--target-len {space.target_len}: needs --evaluator training (a table's or your evaluator's "
                         "compute is what it recorded, at its own length)")  # fmt: skip
    if opts.evaluator != "training":  # the space's own target_len: a table's compute is at the length it recorded
        space = dataclasses.replace(space, target_len=None)
    if opts.evaluator != "training":
        try:
            space = restrict_to_evaluator(space, opts.evaluator)
        except ValueError as exc:
            raise UsageError(f"--evaluator {opts.evaluator}: {exc}") from exc
    multi = len(space.objectives) > 1
    if opts.pruner == "moasha" and not multi:
        raise UsageError("--pruner moasha needs two objectives: drop --compute none, or use asha or median")
    if opts.pruner in ("asha", "median") and multi:
        raise UsageError(f"--pruner {opts.pruner} is single-objective (Optuna's): use moasha, or --compute none")
    try:
        check_strategy(opts.strategy, space, evaluator=opts.evaluator, constrained=_constrained(opts),
                       options=_strategy_options(opts))  # fmt: skip
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    return space, SEARCH_PRESETS[opts.preset]


def _constrained(opts: SearchOptions) -> bool:
    return opts.max_flops is not None or opts.max_latency_ms is not None


def _strategy_options(opts: SearchOptions) -> dict[str, Any]:
    return {"pretrain": opts.pretrain, "pretrain_steps": opts.pretrain_steps, "agent": opts.agent}


def default_out(space: str) -> Path:
    stem = Path(space).stem if space.endswith((".yaml", ".yml")) else space
    return Path("runs") / f"{stem}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"


DEFAULT_POPULATION = {"cpu": 1, "cuda": 16}
"""``--population`` by the device trials run on (README, "Populations"). CPU: 1, because CPU
training of these models is bound by arithmetic, not launches, and a population was still a little
slower than one-by-one trials in ``benchmarks/gpu_throughput.py`` (0.94x at 6 members). CUDA: 16, where
a trial uses a fraction of a percent of the card; not yet measured by that benchmark on a GPU.
Recorded or user evaluators: 1 (a lookup gains nothing from company, and the strategy would wait
for whole batches)."""


def _task(space: SearchSpace, opts: SearchOptions) -> tuple[str, dict[str, Any]]:
    given = dict(opts.task_params or {})
    if opts.task is None or opts.task == space.task:
        return space.task, {**space.task_params, **given}
    return opts.task, given


def _preflight(opts: SearchOptions, task: str, task_kwargs: dict[str, Any]) -> optuna.storages.BaseStorage | None:
    """Checks that need more than the flags themselves, before the run dir exists: the device, the
    task (one small batch of each split against the Task protocol), ``--storage``. Returns the
    storage when ``--storage`` was given."""
    if opts.backend == "local":  # on Ray the workers' devices count (checked against the cluster)
        try:
            resolve_device(opts.device)
        except ValueError as exc:
            raise UsageError(f"--device {opts.device}: {exc}") from exc
    if opts.evaluator == "training":
        try:
            check_task(make_task(task, **task_kwargs))
        except Exception as exc:  # the task's own code may raise anything
            raise UsageError(f"--task {task}: {describe(exc)}") from exc
    if opts.storage is None:
        return None
    try:
        return open_storage(opts.storage)
    except Exception as exc:
        raise UsageError(f"--storage {opts.storage!r}: {describe(exc)}") from exc


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """Optuna's RDB storage with heartbeats: a trial whose process died is told apart from a live one
    (see :func:`recover_interrupted`)."""
    import sqlalchemy.exc

    for attempt in range(6):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(url, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S)
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
            # Searches started together on a fresh PostgreSQL database race to create Optuna's
            # schema (CREATE TABLE is not idempotent there); the loser retries once the winner's
            # tables exist. Optuna's RDBStorage does not retry this itself.
            if attempt == 5:
                raise
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


def study_name_for(run_dir: Path) -> str:
    """A run's own study name, so runs can share one ``--storage``: the run dir's name and a short
    hash of its full path (two ``runs/x`` in different places stay apart)."""
    digest = hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:6]
    return f"{run_dir.name}-{digest}"


# -- entry point -------------------------------------------------------------------------------------
def run_search(opts: SearchOptions, *, stream: TextIO | None = None) -> SearchSummary:
    """Run (or resume) a search; returns its summary.

    Raises :class:`UsageError` on bad input, before the run dir exists (or, for a run dir this call
    created, after removing it again), and :class:`~attn_search.errors.SearchAborted` when the
    first trials all failed the same way (see :mod:`attn_search.search.failures`).
    """
    stream = stream or sys.stdout
    opts = _resumed_defaults(opts)
    space, preset = _check(opts)
    task, task_kwargs = _task(space, opts)
    user_storage = _preflight(opts, task, task_kwargs)
    out = Path(opts.out) if opts.out else default_out(opts.space)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file: name a directory for the run")
    if opts.resume and not (out / RUN_FILE).is_file():
        raise UsageError(f"--resume: {out} holds no run to resume ({RUN_FILE} missing)")
    if not opts.resume and (out / RUN_FILE).exists():
        raise UsageError(f"--out {out} already holds a run: add --resume to continue it, or choose another --out")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--out {out}: cannot create it ({exc.strerror})") from exc
    try:
        with RunLock(out):
            return _run_locked(opts, space, preset, out, task, task_kwargs, user_storage, stream)
    except UsageError:
        if created and not (out / "trials.csv").exists():  # refused before any trial: leave nothing behind
            shutil.rmtree(out, ignore_errors=True)
        raise


def _resumed_defaults(opts: SearchOptions) -> SearchOptions:
    """On ``--resume``, what the run was started with where a flag is not given again
    (``--target-len``: the compute objectives must be measured alike)."""
    run_file = Path(opts.out) / RUN_FILE if opts.out else None
    if not opts.resume or run_file is None or not run_file.is_file() or opts.target_len is not None:
        return opts
    try:
        started = RunRecord.read(run_file.parent)
    except (OSError, ValueError):
        return opts  # the resume check reports the broken run file
    return dataclasses.replace(opts, target_len=started.target_len)


def _hypervolume_bounds(space: SearchSpace, opts: SearchOptions, task: str, task_kwargs: dict[str, Any]) -> dict:
    """The fixed compute ranges of the run's hypervolume (:data:`attn_search.report.outputs.HYPERVOLUME_DEFINITION`)."""
    evaluator = make_evaluator(opts.evaluator, space, task=task, task_kwargs=task_kwargs)
    grids = evaluator.grids(space, 5)
    bounds: dict[str, list[float] | None] = {}
    for metric in space.metrics[1:]:
        try:
            bounds[metric] = list(evaluator.bounds(space, metric, grids))
        except ValueError:
            bounds[metric] = None  # measured (latency, memory): 0 to the largest value seen
    return bounds


def _run_locked(
    opts: SearchOptions, space: SearchSpace, preset: SearchPreset, out: Path, task: str,
    task_kwargs: dict[str, Any], user_storage: optuna.storages.BaseStorage | None, stream: TextIO,
) -> SearchSummary:  # fmt: skip
    run_file = out / RUN_FILE
    if opts.resume:
        record = RunRecord.read(out)
        if record.space_fingerprint != space.fingerprint():
            raise UsageError(
                f"--resume: {out} was searched over space {record.space!r} ({record.space_fingerprint}); "
                f"--space {opts.space!r} with --compute {opts.compute} is a different space ({space.fingerprint()})"
            )
    elif run_file.exists():  # another search created it between our check and the lock
        raise UsageError(f"--out {out} already holds a run: add --resume to continue it, or choose another --out")
    trials = opts.trials or preset.trials
    time_budget = opts.time_budget if opts.time_budget is not None else (None if opts.trials else preset.time_budget)
    budget = dataclasses.replace(PRESETS[preset.budget], target_len=space.target_len)
    if opts.steps is not None:
        budget = dataclasses.replace(budget, steps=opts.steps)
    if not opts.resume:
        options = {k: v for k, v in dataclasses.asdict(opts).items() if k != "enqueue"}
        record = RunRecord(space=opts.space, space_fingerprint=space.fingerprint(), created=time.time(),
                           options=options, task=task, task_params=task_kwargs,
                           study_name=opts.study_name or study_name_for(out),
                           hypervolume_bounds=_hypervolume_bounds(space, opts, task, task_kwargs),
                           budget=dataclasses.asdict(budget), space_definition=space.to_dict())  # fmt: skip
        record.write(out)
    storage = user_storage or open_storage(f"sqlite:///{(out / 'study.db').resolve()}")
    backend = make_backend(opts.backend, run_dir=out, resume=opts.resume, ray_options=_ray_options(opts))
    runner = TrialRunner(space=space, budget=budget, task=task, task_kwargs=task_kwargs, seed=opts.seed,
                         device=opts.device, max_flops=opts.max_flops, max_latency_ms=opts.max_latency_ms,
                         evaluator=_absolute(opts.evaluator))  # fmt: skip
    population = opts.population or record.population  # none: the device's default
    outputs = RunOutputs.from_record(out, record, space)
    progress = Progress(stream, quiet=opts.quiet, total=trials,
                        compute_metric=space.metrics[1] if len(space.metrics) > 1 else M.FLOPS)  # fmt: skip
    loop = SearchLoop(opts, space=space, runner=runner, backend=backend, outputs=outputs, progress=progress,
                      storage=storage, study_name=record.study_name, trials=trials,
                      time_budget=time_budget, population=population,
                      confirm=_confirm_count(opts, preset))  # fmt: skip
    return loop.run()


def _confirm_count(opts: SearchOptions, preset: SearchPreset) -> int:
    """``--confirm``, else the preset's (real training only: a lookup gives one result per configuration)."""
    if opts.confirm is not None:
        return opts.confirm
    return preset.confirm if opts.evaluator == "training" else 0


def _absolute(spec: str) -> str:
    """A table path made absolute, so Ray workers started elsewhere find it."""
    return f"table:{Path(spec[6:]).resolve()}" if spec.startswith("table:") else spec


def _ray_options(opts: SearchOptions) -> Any:
    if opts.backend != "ray":
        return None
    from attn_search.backends.ray_tune import RayOptions

    return RayOptions(address=opts.address, cpus_per_trial=opts.cpus_per_trial, gpus_per_trial=opts.gpus_per_trial,
                      max_concurrent=opts.max_concurrent, device=opts.device)  # fmt: skip


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
    docstring). Thread-safe where backends call in from their own threads (rungs, starts)."""

    def __init__(
        self, opts: SearchOptions, *, space: SearchSpace, runner: TrialRunner, backend: Backend,
        outputs: RunOutputs, progress: Progress, storage: optuna.storages.BaseStorage, study_name: str,
        trials: int, time_budget: float | None, population: int | None = 1, confirm: int = 0,
    ) -> None:  # fmt: skip
        self.opts, self.space, self.runner, self.backend = opts, space, runner, backend
        self.outputs, self.progress, self.storage, self.study_name = outputs, progress, storage, study_name
        self.trials, self.time_budget = trials, time_budget
        self.population = population or 1
        self._population_given = population is not None
        self.owner = run_owner(outputs.run_dir)
        self.lock = threading.RLock()
        self.live: dict[int, optuna.Trial] = {}
        self.curves: dict[int, list[tuple[int, float]]] = {}
        self.trial_seconds = 0.0
        self.population_fallbacks = 0
        self.aborted: str | None = None
        self.deadline: float | None = None
        self.confirm = confirm
        self._warned_latency = False
        self._slot: int | None = None  # the first trial of the population being filled

    # -- set up --------------------------------------------------------------------------------
    def _study(self, strategy: Strategy) -> optuna.Study:
        opts, space = self.opts, self.space
        pruner_name = self.pruner_name
        optuna_pruner: optuna.pruners.BasePruner = {
            "asha": optuna.pruners.SuccessiveHalvingPruner(reduction_factor=int(opts.eta)),
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
                sampler=optuna.samplers.RandomSampler(seed=opts.seed), pruner=optuna_pruner, load_if_exists=opts.resume,
            )  # fmt: skip
        except optuna.exceptions.DuplicatedStudyError as exc:
            raise UsageError(
                f"--study-name {self.study_name!r} already exists in --storage: add --resume to continue that run, "
                "or choose another --study-name"
            ) from exc
        if not opts.resume:
            study.set_metric_names(list(space.metrics))  # optuna-dashboard shows "accuracy", "flops"
            for values in opts.enqueue or ():
                study.enqueue_trial(values)
        return study

    def _session_seed(self) -> int:
        """The strategy's seed: ``--seed`` for a new run; on ``--resume``, derived from it and the
        trials already run, so a resumed search does not draw the first session's proposals again."""
        if not self.opts.resume:
            return self.opts.seed
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            n = len(optuna.load_study(study_name=self.study_name, storage=self.storage).get_trials(deepcopy=False))
        return (self.opts.seed + 1_000_003 * n) % 2**31

    @property
    def pruner_name(self) -> str:
        return self.opts.pruner or ("moasha" if len(self.space.objectives) > 1 else "asha")

    def run(self) -> SearchSummary:
        opts, space = self.opts, self.space
        start = time.perf_counter()
        self.deadline = None if self.time_budget is None else time.time() + self.time_budget
        self.runner.deadline = self.deadline  # the last trial stops training at the deadline
        rung_steps = self.runner.budget.rung_steps()
        # no decision at the first rung (grace period): see attn_search.search.pruning
        moasha = MOASHA(space.directions, eta=opts.eta, grace_period=rung_steps[1] if len(rung_steps) > 1 else 0)
        self.rule = _Rule(self.pruner_name, space, moasha)
        self.backend.start(self.runner, on_rung=self.on_rung, on_start=self.on_start,
                           ask=lambda slot: self._ask_job(strategy, slot), record=lambda event: self._event(event, strategy))  # fmt: skip
        if not self._population_given:
            self.population = (
                DEFAULT_POPULATION[self.backend.device_kind()] if self.runner.evaluator == "training" else 1
            )
        context = StrategyContext(space=space, seed=self._session_seed(), trials=self.trials,
                                  slots=self.backend.slots() * self.population,
                                  run_dir=self.outputs.run_dir, resume=opts.resume, evaluator=self.runner.evaluator,
                                  compute=opts.compute, options=_strategy_options(opts), task=self.runner.task,
                                  task_kwargs=self.runner.task_kwargs)  # fmt: skip
        strategy = make_strategy(opts.strategy, context, constrained=_constrained(opts))
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
        self.outputs.write_all(study, wall_seconds=wall, trial_seconds=self.trial_seconds, options=opts)
        stopped_by = self._stopped_by()
        if interrupted:
            raise KeyboardInterrupt
        if self.aborted is not None:
            raise SearchAborted(f"{self.aborted} (tracebacks in {self.outputs.run_dir / ERROR_LOG})")
        if self.confirm > 0:  # (a kill here loses no retrain: --resume runs no trial and continues it)
            from attn_search.confirm import confirm_seeds

            confirm_seeds(self.outputs.run_dir, seeds=self.confirm, device=opts.device,
                          say=lambda text: self.progress.note(text))  # fmt: skip
        if opts.evaluator == "training" and opts.attention_picture:  # (real training: a model to look inside)
            from attn_search.report.attention_map import draw_attention

            draw_attention(self.outputs.run_dir, device=opts.device, say=lambda text: self.progress.note(text))
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
                # may still be asking for refills: its slot is taken until its Tune trial ends)
                return
            for event in self.backend.wait(timeout=1.0):
                self._event(event, strategy)

    def _ask_job(self, strategy: Strategy, slot: int | None = None) -> Job | None:
        """The next proposal as a job, live from now on; ``None`` when the budget allows no more.
        Also what a population (``slot``: its first trial) asks when a member's slot frees (a refill)."""
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

    def _event(self, event: Event, strategy: Strategy) -> None:
        if isinstance(event, Note):
            self.progress.note(event.text)
        elif isinstance(event, Finished):
            self._record(event, strategy)

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
        lengths = [L for L in (self.outputs.task_len(), self.space.target_len) if L]
        return compute_key(self.space, self.space.active_values(params), lengths)

    def _values(self, trial: optuna.Trial) -> dict[str, Any]:
        return self.space.active_values(dict(trial.params))

    # -- called by backends (any thread) ---------------------------------------------------------
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
            curve = self.curves.setdefault(number, [])
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
    if storage.get_heartbeat_interval() is not None:  # type: ignore[attr-defined]
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
