"""A search's options checked once into a typed plan (:class:`RunPlan`): what the loop runs.

:class:`SearchOptions` is what ``run_search.py`` accepts, one field per flag. :func:`make_plan`
checks them all before anything exists (one-line :class:`~attn_search.errors.UsageError`: exit
status 2) and resolves them: the space with its compute objective and target length, the task,
the trial's training budget, trials and time budget, population, confirmation, storage and the
early-stopping rule. The loop (:mod:`attn_search.search.loop`) reads the plan, never the options;
``run.json`` keeps the options as given (:class:`~attn_search.search.rundir.RunRecord`). A
backend's own flags (``--address``, ``--cpus-per-trial``, ...) are checked by the backends
(:func:`~attn_search.backends.check_backend`).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import time
import warnings
from pathlib import Path
from typing import Any

import optuna

from attn_search.backends import BackendOptions, check_backend
from attn_search.engine import metrics as M
from attn_search.engine.patterns import FLEX_BLOCK
from attn_search.engine.tasks import check_task, make_task
from attn_search.engine.trainer import PRESETS, Budget, resolve_device
from attn_search.errors import UsageError
from attn_search.report.outputs import parse_selection
from attn_search.search.evaluators import recorded_task, restrict_to_evaluator, tiles_flat_at
from attn_search.search.failures import describe
from attn_search.search.rundir import RUN_FILE, RunRecord
from attn_search.search.space import SearchSpace, load_space
from attn_search.strategies import check_strategy

PRUNERS = ("moasha", "asha", "median", "none")
HEARTBEAT_S = 10
"""Seconds between heartbeats of a running trial; one missed for :data:`GRACE_S` marks it dead."""
GRACE_S = 60


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
    compute: str | None = None
    """``--compute``: a :data:`~attn_search.engine.metrics.COMPUTE_OBJECTIVES` choice or ``none``;
    ``None``: the space's own compute objective (the sparse space's is ``attn_tile_flops``)."""
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


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """A search's options, checked and resolved once (:func:`make_plan`): everything the loop reads."""

    options: SearchOptions
    """As given (after ``--resume``'s defaults): what ``run.json`` records, not what the loop reads."""
    space_spec: str
    """``--space`` as given: a built-in name or a YAML path."""
    space: SearchSpace
    """Loaded, with its compute objective, target length and (for a table) the table's values."""
    task: str
    task_kwargs: dict[str, Any]
    budget: Budget
    """One trial's training budget: the preset's, ``--steps``, compute counted at the target length."""
    trials: int
    time_budget: float | None
    population: int | None
    """``--population``; none: the run's recorded one on ``--resume``, else the device's default."""
    confirm: int
    out: Path
    storage: optuna.storages.BaseStorage | None
    """``--storage``, opened; none: the run dir's SQLite file."""
    study_name: str | None
    strategy: str
    strategy_options: dict[str, Any]
    constrained: bool
    evaluator: str
    """``training``, ``table:ABSOLUTE_PATH`` or ``module:callable``."""
    pruner: str
    """The early-stopping rule: ``moasha``, ``asha``, ``median`` or ``none``."""
    eta: float
    seed: int
    device: str
    resume: bool
    enqueue: tuple[dict[str, Any], ...]
    attention_picture: bool
    backend: str
    backend_options: BackendOptions
    max_flops: float | None
    max_latency_ms: float | None
    compute: str
    quiet: bool
    compute_note: str | None = None
    """Why the search counts another compute than its space's own, where it does (the console says it)."""


def make_plan(opts: SearchOptions) -> RunPlan:
    """Check ``opts`` and resolve them into a :class:`RunPlan` (:class:`UsageError` on bad input,
    before the run dir exists)."""
    opts = _resumed_defaults(opts)
    space, preset = _check(opts)
    space, compute_note = _flat_tiles(space, opts)
    # the compute objective searched, recorded as a --compute choice (run.json, a resume)
    compute = space.own_compute() or "none"
    opts = dataclasses.replace(opts, compute=compute)
    task, task_kwargs = search_task(space, opts)
    storage = _preflight(opts, task, task_kwargs)
    out = Path(opts.out) if opts.out else default_out(opts.space)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file: name a directory for the run")
    if opts.resume and not (out / RUN_FILE).is_file():
        raise UsageError(f"--resume: {out} holds no run to resume ({RUN_FILE} missing)")
    if not opts.resume and (out / RUN_FILE).exists():
        raise UsageError(f"--out {out} already holds a run: add --resume to continue it, or choose another --out")
    budget = dataclasses.replace(PRESETS[preset.budget], target_len=space.target_len)
    if opts.steps is not None:
        budget = dataclasses.replace(budget, steps=opts.steps)
    return RunPlan(
        options=opts, space_spec=opts.space, space=space, task=task, task_kwargs=task_kwargs, budget=budget,
        trials=opts.trials or preset.trials,
        time_budget=opts.time_budget if opts.time_budget is not None else (None if opts.trials else preset.time_budget),
        population=opts.population, confirm=_confirm_count(opts, preset), out=out, storage=storage,
        study_name=opts.study_name, strategy=opts.strategy, strategy_options=_strategy_options(opts),
        constrained=_constrained(opts), evaluator=_absolute(opts.evaluator),
        pruner=opts.pruner or ("moasha" if len(space.objectives) > 1 else "asha"), eta=opts.eta, seed=opts.seed,
        device=opts.device, resume=opts.resume, enqueue=tuple(opts.enqueue or ()),
        attention_picture=opts.attention_picture, backend=opts.backend, backend_options=_backend_options(opts),
        max_flops=opts.max_flops, max_latency_ms=opts.max_latency_ms, compute=compute, quiet=opts.quiet,
        compute_note=compute_note,
    )  # fmt: skip


def _flat_tiles(space: SearchSpace, opts: SearchOptions) -> tuple[SearchSpace, str | None]:
    """A table search whose space counts tiles (the sparse space) where the table's rows all compute
    the same tiles (:func:`~attn_search.search.evaluators.tiles_flat_at`: every shipped table)
    counts kept entries instead, unless ``--compute`` asked for tiles: a flat compute axis would
    leave a front of one point."""
    length = None if opts.compute is not None else tiles_flat_at(space, opts.evaluator)
    if length is None:
        return space, None
    note = (f"(the space counts {M.ATTN_TILE_FLOPS}, but at the table's L={length} every configuration computes the "
            f"same {FLEX_BLOCK}-tiles: this search counts kept entries, attn_flops; --compute {M.ATTN_TILE_FLOPS} "
            "counts the tiles anyway)")  # fmt: skip
    return space.with_compute("attn_flops"), note


def _check(opts: SearchOptions) -> tuple[SearchSpace, SearchPreset]:
    if opts.evaluator.startswith("table:") and not Path(opts.evaluator[6:]).is_file():
        raise UsageError(f"--evaluator {opts.evaluator!r}: no such table")
    if opts.pretrain and not Path(opts.pretrain).is_file():
        raise UsageError(f"--pretrain {opts.pretrain!r}: no such table")
    try:  # a backend's flags are checked by that backend
        check_backend(opts.backend, _backend_options(opts))
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    if opts.preset not in SEARCH_PRESETS:
        raise UsageError(f"--preset {opts.preset!r} is unknown: use one of {', '.join(SEARCH_PRESETS)}")
    if opts.compute is not None and opts.compute not in (*M.COMPUTE_OBJECTIVES, "none"):
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
    if opts.compute is None:  # the space's own compute objective: its first (a YAML may list several)
        space = space.with_compute(space.own_compute())
    else:
        space = space.with_compute(None if opts.compute == "none" else opts.compute)
    if opts.target_len is not None:
        if opts.target_len < 1:
            raise UsageError(f"--target-len {opts.target_len} is invalid: it must be a sequence length >= 1")
        space = dataclasses.replace(space, target_len=opts.target_len)
    if opts.target_len is not None and opts.evaluator != "training":
        raise UsageError(f"--target-len {space.target_len}: needs --evaluator training (a table's or your evaluator's "
                         "compute is what it recorded, at its own length)")  # fmt: skip
    if opts.evaluator != "training":
        try:  # (and the length its compute was recorded at, not the space's target_len)
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


def search_task(space: SearchSpace, opts: SearchOptions) -> tuple[str, dict[str, Any]]:
    """The task family and parameters a search of ``space`` with ``opts`` trains on."""
    given = dict(opts.task_params or {})
    if opts.evaluator.startswith("table:") and opts.task is None:
        try:  # a recorded table's results are its task's, at its length (record.py's header says which)
            family, params = recorded_task(opts.evaluator[len("table:") :])
            return family, {**params, **given}
        except (ValueError, OSError):
            pass  # a table without the recorder's header: the space's task
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


def _resumed_defaults(opts: SearchOptions) -> SearchOptions:
    """On ``--resume``, what the run was started with where a flag is not given again
    (``--target-len``: the compute objectives must be measured alike; ``--population``)."""
    run_file = Path(opts.out) / RUN_FILE if opts.out else None
    if not opts.resume or run_file is None or not run_file.is_file():
        return opts
    try:
        started = RunRecord.read(run_file.parent)
    except (OSError, ValueError):
        return opts  # the resume check reports the broken run file
    return dataclasses.replace(
        opts,
        target_len=started.target_len if opts.target_len is None else opts.target_len,
        population=started.population if opts.population is None else opts.population,
        compute=started.compute if opts.compute is None else opts.compute,
    )


def _confirm_count(opts: SearchOptions, preset: SearchPreset) -> int:
    """``--confirm``, else the preset's (real training only: a lookup gives one result per configuration)."""
    if opts.confirm is not None:
        return opts.confirm
    return preset.confirm if opts.evaluator == "training" else 0


def _absolute(spec: str) -> str:
    """A table path made absolute, so Ray workers started elsewhere find it."""
    return f"table:{Path(spec[6:]).resolve()}" if spec.startswith("table:") else spec


def _backend_options(opts: SearchOptions) -> BackendOptions:
    return BackendOptions(address=opts.address, cpus_per_trial=opts.cpus_per_trial, gpus_per_trial=opts.gpus_per_trial,
                      max_concurrent=opts.max_concurrent, device=opts.device)  # fmt: skip
