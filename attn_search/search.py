"""The search orchestrator: wires a space, a strategy, an evaluator and a backend into a run dir.

Layers (they never blur): the *evaluator* scores a config (:func:`attn_search.evaluate`), the
*strategy* proposes the next one (an Optuna sampler), the *backend* decides where a trial runs
(``local``: in this process, the embedded default). This module only wires them and writes the
run dir. Every finished trial is in the Optuna storage (SQLite in the run dir by default) the
moment it ends, and ``trials.csv``/``pareto.csv`` are rewritten after each one, so a crash or
``kill -9`` loses no finished trial; ``--resume`` marks the trials a dead process left RUNNING as
interrupted and runs their configurations again.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import shutil
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import optuna
import pandas as pd
import torch

from attn_search import metrics as M
from attn_search.config import AttentionConfig
from attn_search.errors import SearchAborted, UsageError
from attn_search.failures import ERROR_LOG, FailurePolicy, describe, error_attrs, log_error
from attn_search.outputs import RunOutputs, parse_selection
from attn_search.pruning import MOASHA
from attn_search.rl import RL_STRATEGIES, BudgetReached, run_agent
from attn_search.rundir import RunLock
from attn_search.space import SearchSpace, load_space
from attn_search.strategies import OPTUNA_STRATEGIES, make_sampler
from attn_search.tasks import check_task, make_task
from attn_search.trainer import PRESETS, Budget, evaluate, resolve_device

STUDY_NAME = "attn_search"
RUN_FILE = "run.json"
PRUNERS = ("moasha", "asha", "median", "none")
BACKENDS = ("local", "ray")


@dataclasses.dataclass(frozen=True)
class SearchPreset:
    """Trials, per-trial budget and wall-time cap of a ``--preset``."""

    trials: int
    budget: str
    time_budget: float | None


SEARCH_PRESETS = {
    "smoke": SearchPreset(trials=6, budget="smoke", time_budget=None),
    # 25-90 s trials on 2 CPU cores; the cap (which also cuts the last trial's training short)
    # keeps the default run under 10 minutes, outputs included.
    "default": SearchPreset(trials=24, budget="default", time_budget=540.0),
    "full": SearchPreset(trials=100, budget="full", time_budget=None),
}


class TrialFailed(Exception):
    """A trial ended with ``state="failed"`` (recorded with its reason; the search goes on)."""


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
    trials: int | None = None
    time_budget: float | None = None
    preset: str = "default"
    steps: int | None = None
    task: str | None = None
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
    quiet: bool = False
    evaluator: str = "training"
    """``training`` (real training) or ``table:PATH`` (look results up in a recorded table)."""
    pretrain: str | None = None
    pretrain_steps: int = 2000
    agent: str | None = None
    enqueue: list[dict[str, Any]] | None = None
    """Configurations (searched values) to evaluate first, in order (``attn-search record``)."""


@dataclasses.dataclass
class SearchSummary:
    """What a finished search reports."""

    run_dir: Path
    n_finished: int
    n_complete: int
    n_pruned: int
    n_failed: int
    front_size: int
    hypervolume: float
    wall_seconds: float
    trial_seconds: float

    @property
    def overhead_fraction(self) -> float:
        """Share of wall time spent outside training and evaluation (sampler, storage, outputs)."""
        return max(0.0, self.wall_seconds - self.trial_seconds) / self.wall_seconds if self.wall_seconds else 0.0


def _check(opts: SearchOptions) -> tuple[SearchSpace, SearchPreset]:
    if opts.strategy not in (*OPTUNA_STRATEGIES, *RL_STRATEGIES):
        strategies = ", ".join((*OPTUNA_STRATEGIES, *RL_STRATEGIES))
        raise UsageError(f"--strategy {opts.strategy!r} is unknown: use one of {strategies}")
    if (opts.pretrain or opts.agent) and opts.strategy not in RL_STRATEGIES:
        raise UsageError("--pretrain and --agent apply to --strategy ppo or a2c")
    if opts.evaluator != "training" and not opts.evaluator.startswith("table:"):
        raise UsageError(f"--evaluator {opts.evaluator!r} is unknown: use training or table:PATH")
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
    if opts.steps is not None and opts.steps < 1:
        raise UsageError(f"--steps {opts.steps} is invalid: it must be at least 1")
    if opts.trials is not None and opts.trials < 1:
        raise UsageError(f"--trials {opts.trials} is invalid: it must be at least 1")
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
    if opts.evaluator.startswith("table:"):
        try:
            space = restrict_to_table(space, opts.evaluator[6:])
        except ValueError as exc:
            raise UsageError(f"--evaluator {opts.evaluator}: {exc}") from exc
    multi = len(space.objectives) > 1
    if opts.pruner == "moasha" and not multi:
        raise UsageError("--pruner moasha needs two objectives: drop --compute none, or use asha or median")
    if opts.pruner in ("asha", "median") and multi:
        raise UsageError(f"--pruner {opts.pruner} is single-objective (Optuna's): use moasha, or --compute none")
    if opts.strategy in RL_STRATEGIES:
        if len(space.objectives) < 2:
            raise UsageError(f"--strategy {opts.strategy} rewards front hypervolume: it needs a compute objective")
        if not opts.pretrain and opts.evaluator == "training" and space.metrics[1] not in (M.FLOPS, M.PARAMS):
            raise UsageError(f"--strategy {opts.strategy} needs --compute flops or params (or --pretrain TABLE)")
        return space, SEARCH_PRESETS[opts.preset]
    try:
        make_sampler(opts.strategy, seed=opts.seed, n_objectives=len(space.objectives), n_trials=10,
                     constraints_func=_constraints if _constrained(opts) else None)  # fmt: skip
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    return space, SEARCH_PRESETS[opts.preset]


def restrict_to_table(space: SearchSpace, path: str) -> SearchSpace:
    """The space with every parameter categorical over the values recorded in the table at ``path``
    (so every proposal is a row of it)."""
    from attn_search.envs.attention_search import TableEvaluator

    grids = TableEvaluator(path, space).grids(space, 0)
    params = tuple(
        dataclasses.replace(p, kind="categorical", choices=tuple(g), low=None, high=None, log=False, step=None)
        for p, g in zip(space.params, grids, strict=True)
    )
    return dataclasses.replace(space, params=params)


def _constrained(opts: SearchOptions) -> bool:
    return opts.max_flops is not None or opts.max_latency_ms is not None


def _constraints(trial: optuna.trial.FrozenTrial) -> list[float]:
    """Optuna's convention: values <= 0 are feasible."""
    return list(trial.user_attrs.get("constraints", [0.0]))


def default_out(space: str) -> Path:
    stem = Path(space).stem if space.endswith((".yaml", ".yml")) else space
    return Path("runs") / f"{stem}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"


def _task(space: SearchSpace, opts: SearchOptions) -> tuple[str, dict[str, Any]]:
    if opts.task is None or opts.task == space.task:
        return space.task, dict(space.task_params)
    return opts.task, {}


def _preflight(opts: SearchOptions, task: str, task_kwargs: dict[str, Any]) -> optuna.storages.BaseStorage | None:
    """Checks that need more than the flags themselves, before the run dir exists: the device, the
    task (one small batch of each split against the Task protocol), ``--storage``. Returns the
    storage when ``--storage`` was given."""
    if opts.backend == "local":  # on Ray the workers' devices count (checked against the cluster)
        try:
            resolve_device(opts.device)
        except ValueError as exc:
            raise UsageError(f"--device {opts.device}: {exc}") from exc
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


HEARTBEAT_S = 10
"""Seconds between heartbeats of a running trial; one missed for :data:`GRACE_S` marks it dead."""
GRACE_S = 60


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """Optuna's RDB storage with heartbeats: a trial whose process died is told apart from a live one
    (see :func:`recover_interrupted`)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(url, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S)


def run_search(opts: SearchOptions, *, stream: TextIO | None = None) -> SearchSummary:
    """Run (or resume) a search; returns its summary.

    Raises :class:`UsageError` on bad input, before the run dir exists (or, for a run dir this call
    created, after removing it again), and :class:`~attn_search.errors.SearchAborted` when the
    first trials all failed the same way (see :mod:`attn_search.failures`).
    """
    stream = stream or sys.stdout
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


def _run_locked(
    opts: SearchOptions, space: SearchSpace, preset: SearchPreset, out: Path, task: str,
    task_kwargs: dict[str, Any], user_storage: optuna.storages.BaseStorage | None, stream: TextIO,
) -> SearchSummary:  # fmt: skip
    run_file = out / RUN_FILE
    if opts.resume:
        saved = json.loads(run_file.read_text())
        if saved["space_fingerprint"] != space.fingerprint():
            raise UsageError(
                f"--resume: {out} was searched over space {saved['space']!r} ({saved['space_fingerprint']}); "
                f"--space {opts.space!r} with --compute {opts.compute} is a different space ({space.fingerprint()})"
            )
    elif run_file.exists():  # another search created it between our check and the lock
        raise UsageError(f"--out {out} already holds a run: add --resume to continue it, or choose another --out")
    trials = opts.trials or preset.trials
    time_budget = opts.time_budget if opts.time_budget is not None else (None if opts.trials else preset.time_budget)
    budget = PRESETS[preset.budget]
    if opts.steps is not None:
        budget = dataclasses.replace(budget, steps=opts.steps)
    if not opts.resume:
        options = {k: v for k, v in dataclasses.asdict(opts).items() if k != "enqueue"}
        record = {"space": opts.space, "space_fingerprint": space.fingerprint(), "created": time.time(),
                  "options": options, "task": task, "task_params": task_kwargs,
                  "budget": dataclasses.asdict(budget), "space_definition": space.to_dict()}  # fmt: skip
        run_file.write_text(json.dumps(record, indent=2, default=str))
    storage = user_storage or open_storage(f"sqlite:///{(out / 'study.db').resolve()}")
    constraints_func = _constraints if _constrained(opts) else None
    rl = opts.strategy in RL_STRATEGIES
    sampler = (
        optuna.samplers.RandomSampler(seed=opts.seed)  # the agent enqueues every proposal
        if rl
        else make_sampler(
            opts.strategy,
            seed=opts.seed,
            n_objectives=len(space.objectives),
            n_trials=trials,
            constraints_func=constraints_func,
        )
    )
    pruner_name = opts.pruner or ("moasha" if len(space.objectives) > 1 else "asha")
    optuna_pruner: optuna.pruners.BasePruner = {
        "asha": optuna.pruners.SuccessiveHalvingPruner(reduction_factor=int(opts.eta)),
        "median": optuna.pruners.MedianPruner(n_startup_trials=3),
    }.get(pruner_name, optuna.pruners.NopPruner())
    # ERROR: Optuna logs every failed trial with its traceback at WARNING; ours go to errors.log and
    # the progress line says why the trial failed
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study(
        storage=storage, study_name=STUDY_NAME, directions=space.directions,  # type: ignore[arg-type]
        sampler=sampler,
        pruner=optuna_pruner, load_if_exists=opts.resume,
    )  # fmt: skip
    outputs = RunOutputs(out, space=space, select=opts.select, constrained=constraints_func is not None)
    if opts.enqueue and not opts.resume:
        for values in opts.enqueue:
            study.enqueue_trial(values)
    owner = run_owner(out)
    recovered = recover_interrupted(study, owner=owner)
    policy = FailurePolicy(armed=not any(_got_through(t) for t in study.get_trials(deepcopy=False)))
    rung_steps = budget.rung_steps()
    # no decision at the first rung (grace period): see attn_search.pruning
    moasha = MOASHA(space.directions, eta=opts.eta, grace_period=rung_steps[1] if len(rung_steps) > 1 else 0)
    if pruner_name == "moasha":
        _replay_rungs(study, moasha, space)
    done = count_finished(study)
    remaining = max(0, trials - done)
    progress = Progress(stream, quiet=opts.quiet, total=trials, outputs=outputs)
    progress.start(study, recovered=recovered, remaining=remaining, out=out)

    runner = TrialRunner.from_options(opts, space, budget, task, task_kwargs)
    start = time.perf_counter()
    runner.deadline = None if time_budget is None else time.time() + time_budget
    log = TrialLog(outputs, progress, policy)
    objective = _Objective(runner=runner, pruner=pruner_name, moasha=moasha, progress=progress, log=log, owner=owner)
    if remaining and opts.backend == "ray" and not rl:
        objective.trial_seconds = _import_ray_backend().run_ray(
            opts, study=study, outputs=outputs, progress=progress, runner=runner, sampler=sampler,
            pruner=pruner_name, moasha=moasha, trials=trials, time_budget=time_budget, out=out, log=log,
        )  # fmt: skip
        stopped_early = count_finished(study) < trials and log.aborted is None
        if stopped_early and (runner.deadline is None or time.time() < runner.deadline):
            outputs.write_all(study, wall_seconds=time.perf_counter() - start, trial_seconds=objective.trial_seconds,
                              options=opts)  # fmt: skip
            raise KeyboardInterrupt  # Tune stopped early on SIGINT; its state is saved for --resume
    elif remaining and rl:
        _search_with_agent(study, objective, outputs, progress, opts, space, trials, time_budget, start)
    elif remaining:
        study.optimize(objective, n_trials=remaining, timeout=time_budget, catch=(TrialFailed,), callbacks=[log])
    wall = time.perf_counter() - start
    outputs.write_all(study, wall_seconds=wall, trial_seconds=objective.trial_seconds, options=opts)
    log.raise_if_aborted()
    summary = outputs.summary(study, wall_seconds=wall, trial_seconds=objective.trial_seconds)
    progress.finish(summary)
    return summary


def _search_with_agent(
    study: optuna.Study, objective: _Objective, outputs: RunOutputs, progress: Progress, opts: SearchOptions,
    space: SearchSpace, trials: int, time_budget: float | None, start: float,
) -> None:  # fmt: skip
    """Let an SB3 agent propose; every proposal runs as a trial of ``study`` (see attn_search.rl)."""
    log = objective.log

    def run_trial(values: dict[str, Any]) -> dict[str, float] | None:
        over_time = time_budget is not None and time.perf_counter() - start > time_budget
        if count_finished(study) >= trials or over_time or log.aborted is not None:
            raise BudgetReached
        study.enqueue_trial(values, skip_if_exists=False)
        study.optimize(objective, n_trials=1, catch=(TrialFailed,), callbacks=[log])
        last = study.trials[-1]
        if last.state != optuna.trial.TrialState.COMPLETE:
            return None
        return dict(last.user_attrs.get("metrics", {}))

    def learn(run_batch: Any = None, n_envs: int = 1) -> None:
        run_agent(
            opts.strategy, space, run_trial, n_trials=trials - count_finished(study), seed=opts.seed,
            compute=opts.compute, pretrain=opts.pretrain, pretrain_steps=opts.pretrain_steps, agent_path=opts.agent,
            grid_table=opts.evaluator[6:] if opts.evaluator.startswith("table:") else opts.pretrain,
            save_to=outputs.run_dir / "agent.zip", run_batch=run_batch, n_envs=n_envs,
        )  # fmt: skip

    if opts.backend != "ray":
        learn()
        return
    # On Ray the agent acts in several envs at once; each vector step's proposals train in parallel
    # as Ray tasks (see attn_search.rl._batched_env and attn_search.ray_backend.agent_batches).
    ray_backend = _import_ray_backend()
    with ray_backend.agent_batches(opts, study=study, outputs=outputs, progress=progress, runner=objective.runner,
                                   trials=trials, time_budget=time_budget, log=log) as batches:  # fmt: skip
        learn(batches, batches.n_envs)
    objective.trial_seconds = batches.driver.trial_seconds


def _import_ray_backend() -> Any:
    """The Ray backend module (Ray is imported only here, only for ``--backend ray``)."""
    try:
        from attn_search import ray_backend
    except ImportError as exc:
        raise UsageError(f"--backend ray needs Ray Tune ({exc}): pip install -e '.[ray]'") from exc
    return ray_backend


@dataclasses.dataclass
class TrialLog:
    """What happens when a trial ends, whichever backend ran it: the tables are rewritten, the
    progress line printed, a traceback appended to ``errors.log``, and the failure policy told
    (:mod:`attn_search.failures`). An Optuna callback for the local backend."""

    outputs: RunOutputs
    progress: Progress
    policy: FailurePolicy
    aborted: str | None = None
    """Why the search must stop, once the failure policy said so."""

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        df = self.outputs.write_tables(study)  # the trials table is built once per trial
        self.progress.trial_done(study, trial, df)
        state = M.FAILED if trial.state == optuna.trial.TrialState.FAIL else trial.state.name.lower()
        message = self.policy.observe(state, dict(trial.user_attrs))
        if message is not None and self.aborted is None:
            self.aborted = message
            study.stop()

    def log_error(self, trial: int | str, attrs: dict[str, Any]) -> None:
        """Move a failed trial's traceback out of its attributes into ``errors.log``."""
        if "traceback" in attrs:
            log_error(self.outputs.run_dir, trial, attrs)
            del attrs["traceback"]

    def raise_if_aborted(self) -> None:
        if self.aborted is not None:
            raise SearchAborted(f"{self.aborted} (tracebacks in {self.outputs.run_dir / ERROR_LOG})")


def run_owner(run_dir: Path) -> str:
    """The tag a run dir's trials carry (``owner``): host and run dir."""
    return f"{socket.gethostname()}:{run_dir.resolve()}"


def recover_interrupted(study: optuna.Study, *, owner: str) -> int:
    """Trials left RUNNING by a process that died: mark them failed (``interrupted``) and enqueue
    their parameters so they run again. Returns how many were recovered.

    Called with the run dir's lock held (:class:`~attn_search.rundir.RunLock`), which proves that
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


def count_finished(study: optuna.Study) -> int:
    """Trials that count towards ``--trials``: complete, pruned, or failed on their own."""
    n = 0
    for t in study.get_trials(deepcopy=False):
        if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED) or (
            t.state == optuna.trial.TrialState.FAIL and not t.user_attrs.get("interrupted")
        ):
            n += 1
    return n


def _replay_rungs(study: optuna.Study, moasha: MOASHA, space: SearchSpace) -> None:
    """Rebuild MO-ASHA's rung tables from the trials already in storage (resume)."""
    for t in study.get_trials(deepcopy=False):
        compute = t.user_attrs.get("compute")
        if not compute or t.user_attrs.get("interrupted"):
            continue
        for step, acc in t.user_attrs.get("curve", []):
            moasha.record(t.number, int(step), [acc, *(compute[m] for m in space.metrics[1:])])


@dataclasses.dataclass
class TrialOutcome:
    """What one proposal produced: its state, the attributes recorded with it, its objective values."""

    state: str
    attrs: dict[str, Any]
    values: tuple[float, ...] | None = None

    @property
    def reason(self) -> str:
        return str(self.attrs.get("reason", self.state))


@dataclasses.dataclass
class TrialRunner:
    """Runs one proposal to its outcome: config, training (or a table lookup), constraints, state.

    Backend-neutral, so that the local backend (inside an Optuna objective) and the Ray backend
    (inside a Ray Tune trainable on any node) score a proposal the same way. It must stay picklable.
    """

    space: SearchSpace
    budget: Budget
    task: str
    task_kwargs: dict[str, Any]
    seed: int
    device: str = "auto"
    max_flops: float | None = None
    max_latency_ms: float | None = None
    table_path: str | None = None
    deadline: float | None = None
    """Wall-clock time (``time.time()``) at which training stops and the trial evaluates."""
    _table: Any = dataclasses.field(default=None, repr=False, compare=False)

    @classmethod
    def from_options(cls, opts: SearchOptions, space: SearchSpace, budget: Budget, task: str,
                     task_kwargs: dict[str, Any]) -> TrialRunner:  # fmt: skip
        table = str(Path(opts.evaluator[6:]).resolve()) if opts.evaluator.startswith("table:") else None
        return cls(space=space, budget=budget, task=task, task_kwargs=task_kwargs, seed=opts.seed, device=opts.device,
                   max_flops=opts.max_flops, max_latency_ms=opts.max_latency_ms, table_path=table)  # fmt: skip

    def run(
        self,
        values: dict[str, Any],
        *,
        on_attr: Callable[[str, Any], None] = lambda key, value: None,
        on_rung: Callable[[int, float, dict[str, float]], bool] = lambda step, acc, compute: False,
        on_start: Callable[[AttentionConfig], None] = lambda config: None,
        stopped_by: str = "the pruner",
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
            return self._run(values, attrs, put, on_rung, on_start, stopped_by)
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
        stopped_by: str,
    ) -> TrialOutcome:
        try:
            config = self.space.make_config(values, seed=self.seed)
        except ValueError as exc:
            put("reason", f"invalid configuration: {exc}")
            put("state", M.FAILED)
            return TrialOutcome(M.FAILED, attrs)
        put("config", config.to_dict())
        on_start(config)
        if self.table_path is not None:  # recorded results instead of training
            if self._table is None:
                from attn_search.envs.attention_search import TableEvaluator

                self._table = TableEvaluator(self.table_path, self.space)
            found = self._table(config, values)
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
            result.reason = f"pruned by {stopped_by} at step {result.curve[-1][0]}"
        for key, value in (("metrics", result.metrics), ("state", result.state), ("device", result.device),
                           ("task", result.task)):  # fmt: skip
            put(key, value)
        if result.reason:
            put("reason", result.reason)
        return self._finish(attrs, result.metrics, result.state)

    def _finish(self, attrs: dict[str, Any], metrics: dict[str, float], state: str) -> TrialOutcome:
        constraints = []
        if self.max_flops is not None:
            constraints.append(metrics[M.FLOPS] - self.max_flops)
        if self.max_latency_ms is not None:
            constraints.append(metrics[M.LATENCY_MS] - self.max_latency_ms)
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


@dataclasses.dataclass
class _Objective:
    """The local backend's Optuna objective: a :class:`TrialRunner` plus Optuna's pruners/MO-ASHA."""

    runner: TrialRunner
    pruner: str
    moasha: MOASHA
    progress: Progress
    log: TrialLog
    owner: str
    trial_seconds: float = 0.0

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, ...]:
        trial.set_user_attr("owner", self.owner)  # see recover_interrupted
        values = self.runner.space.suggest(trial)
        metrics = self.runner.space.metrics

        def on_rung(step: int, accuracy: float, compute: dict[str, float]) -> bool:
            self.progress.rung(trial.number, step, accuracy)
            if self.pruner == "moasha":
                return not self.moasha.report(trial.number, step, [accuracy, *(compute[m] for m in metrics[1:])])
            if self.pruner in ("asha", "median"):
                trial.report(accuracy, step)
                return trial.should_prune()
            return False

        outcome = self.runner.run(
            values, on_attr=trial.set_user_attr, on_rung=on_rung, stopped_by=self.pruner,
            on_start=lambda config: self.progress.trial_started(trial.number, config),
        )  # fmt: skip
        self.log.log_error(trial.number, outcome.attrs)
        for key, value in outcome.attrs.items():
            trial.set_user_attr(key, value)
        trial.set_user_attr("node", socket.gethostname())
        self.trial_seconds += outcome.attrs.get("metrics", {}).get(M.WALL_SECONDS, 0.0)
        if outcome.state == M.PRUNED:
            raise optuna.TrialPruned(outcome.reason)
        if outcome.values is None:
            raise TrialFailed(outcome.reason)
        return outcome.values if len(outcome.values) > 1 else outcome.values[0]


class Progress:
    """Live progress: on a terminal a status line rewritten in place plus one line per finished
    trial; elsewhere (logs, CI) plain lines only; nothing with ``quiet``."""

    def __init__(self, stream: TextIO, *, quiet: bool, total: int, outputs: RunOutputs) -> None:
        self.stream = stream
        self.quiet = quiet
        self.total = total
        self.outputs = outputs
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self.t0 = time.perf_counter()
        self.running: dict[int | str, str] = {}

    def _print(self, text: str) -> None:
        if self.quiet:
            return
        if self.tty:
            self.stream.write("\r\x1b[K")
        self.stream.write(text + "\n")
        self.stream.flush()

    def _status(self, text: str) -> None:
        if self.quiet or not self.tty:
            return
        self.stream.write("\r\x1b[K" + text[:160])
        self.stream.flush()

    def start(self, study: optuna.Study, *, recovered: int, remaining: int, out: Path) -> None:
        done = count_finished(study)
        msg = f"attn_search: {remaining} trial(s) to run ({done} of {self.total} done) -> {out}"
        if recovered:
            msg += f"; {recovered} interrupted trial(s) will run again"
        self._print(msg)

    def note(self, text: str) -> None:
        """A line of its own (retries, resumes)."""
        self._print(text)

    def trial_started(self, number: int | str, config: Any) -> None:
        self.running[number] = config.describe()
        self._status(f"  trial {number} running: {config.describe()}")

    def rung(self, number: int | str, step: int, accuracy: float) -> None:
        self._status(f"  trial {number} {self.running.get(number, '')}: step {step} accuracy {accuracy:.3f}")

    def trial_done(self, study: optuna.Study, trial: optuna.trial.FrozenTrial, df: pd.DataFrame | None = None) -> None:
        self.running.pop(trial.number, None)
        stats = self.outputs.stats(study, df)
        metrics = trial.user_attrs.get("metrics", {})
        state = "failed" if trial.state == optuna.trial.TrialState.FAIL else trial.state.name.lower()
        acc = metrics.get(M.ACCURACY, float("nan"))
        compute_metric = self.outputs.space.metrics[1] if len(self.outputs.space.metrics) > 1 else M.FLOPS
        desc = _label(trial)
        self._print(
            f"[{stats['finished']:>3}/{self.total}] trial {trial.number:>3} {state:<8} acc={acc:.3f} "
            f"{compute_metric}={metrics.get(compute_metric, float('nan')):.4g} {desc} | done {stats['complete']} "
            f"pruned {stats['pruned']} failed {stats['failed']} | best acc {stats['best_accuracy']:.3f} "
            f"front {stats['front_size']} HV {stats['hypervolume']:.3f} | {time.perf_counter() - self.t0:.0f}s"
        )

    def finish(self, summary: SearchSummary) -> None:
        self._print(
            f"done: {summary.n_finished} trials ({summary.n_complete} complete, {summary.n_pruned} pruned, "
            f"{summary.n_failed} failed), Pareto front of {summary.front_size}, normalised hypervolume "
            f"{summary.hypervolume:.3f}"
        )
        self._print(
            f"wall {summary.wall_seconds:.1f}s, inside trials {summary.trial_seconds:.1f}s, framework overhead "
            f"{summary.wall_seconds - summary.trial_seconds:.1f}s ({100 * summary.overhead_fraction:.1f}%)"
        )
        self._print(
            f"outputs in {summary.run_dir}: trials.csv pareto.csv best_config.yaml report.html (attn-search report/export)"
        )


def _label(trial: optuna.trial.FrozenTrial) -> str:
    cfg = trial.user_attrs.get("config")
    return AttentionConfig.from_dict(cfg).describe() if cfg else ""
