"""The Ray Tune backend: trials spread over local cores, the GPUs of one machine or a cluster.

Imported only by ``--backend ray`` (Ray is an optional extra). What comes from Ray and Optuna, and
what is ours:

- Proposals: Ray's ``OptunaSearch`` with the same Optuna sampler as the local backend and the
  space's define-by-run ``suggest`` (conditional parameters). :class:`_Searcher` subclasses it
  for three things it does not do: a trial stopped early is told to Optuna as PRUNED (Ray tells
  its last rung as COMPLETE), a failed trial as FAIL (Ray tells FAIL only without a result), and
  no new trial starts after ``--time-budget``.
- Early stopping: Ray's ``ASHAScheduler``/``MedianStoppingRule`` for one objective; for two,
  :class:`_MOASHAScheduler`, a Tune scheduler around the same :class:`~attn_search.pruning.MOASHA`
  rule the local backend uses (Ray has no multi-objective scheduler).
- Trials: :func:`_trainable` runs the backend-neutral :class:`~attn_search.search.TrialRunner` on
  whichever node Ray picks and reports each rung with ``tune.report``, then a final result that
  carries everything the run dir records (config, metrics, curve, node).
- Fault tolerance: ``FailureConfig(max_failures=...)`` retries a trial whose worker or node died;
  a trial that raises is caught in the trainable and reported failed with its reason (no retry: it
  would fail again).
- Outputs: :class:`_Recorder`, a Tune callback on the driver, adds every finished trial to the
  run dir's Optuna study, so ``trials.csv``, the front, plots and report are written by the same
  code as the local backend's (plus the node each trial ran on).
- Restore: the Tune experiment lives in ``RUN_DIR/ray``; ``--resume`` calls ``Tuner.restore``
  (trial table and searcher state) and re-runs the trials that were running.
- RL proposer (``--strategy ppo``/``a2c``): no Tune searcher; the agent acts in one env per
  concurrent slot and :class:`AgentBatches` trains each vector step's proposals as parallel Ray
  tasks (``max_retries`` for dead workers), recorded like the Tune trials.

Objects Tune pickles into its experiment (searcher, scheduler, callback) hold no live state: they
reach the running search through the module-level :data:`_ACTIVE`, so a restored experiment talks
to the new process's study and progress. One Ray search per process at a time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import os
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, MedianStoppingRule, TrialScheduler
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from attn_search import metrics as M
from attn_search.errors import SearchAborted
from attn_search.failures import describe
from attn_search.outputs import RunOutputs
from attn_search.pruning import MOASHA
from attn_search.search import (
    Progress,
    SearchOptions,
    TrialLog,
    TrialRunner,
    UsageError,
    count_finished,
)
from attn_search.space import SearchSpace

EXPERIMENT = "ray"
"""The Tune experiment's folder inside the run dir."""
STEP = "step"
FINAL = "final"
RECORD = "record"
PLACE = ("node", "node_ip", "hostname", "device")
MAX_FAILURES = 3
"""Retries of a trial whose worker died (``FailureConfig``)."""

# Tune snapshots its trial table and searcher every 10+ s by default; a trial that finished after
# the last snapshot is run again on restore. A snapshot costs milliseconds, trials tens of seconds.
os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
# Tune's console table and per-trial logs would bury the progress lines (and cost time per result).
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
# A failed trial's final result has no objective values, on purpose (the searcher tells it FAIL).
os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")


@dataclasses.dataclass
class _Driver:
    """The live side of a Ray search: the run's study, its outputs and progress, the MO-ASHA state."""

    study: optuna.Study
    outputs: RunOutputs
    progress: Progress
    space: SearchSpace
    pruner: str
    moasha: MOASHA
    deadline: float | None
    log: TrialLog
    recorded: set[str] = dataclasses.field(default_factory=set)
    rungs: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    trial_seconds: float = 0.0

    def started(self, trial: Any) -> None:
        try:
            config = self.space.make_config(dict(trial.config))
        except ValueError:
            return
        self.progress.trial_started(trial.trial_id, config)

    def rung(self, trial_id: str, result: dict[str, Any]) -> None:
        seen = self.rungs.setdefault(trial_id, {"curve": []})
        seen["curve"].append((int(result[STEP]), float(result[M.ACCURACY])))
        seen["compute"] = {m: float(result[m]) for m in (M.FLOPS, M.PARAMS, M.LATENCY_MS, M.PEAK_MEM_MB) if m in result}
        seen.update({k: result[k] for k in (*PLACE, "started") if k in result})
        self.progress.rung(trial_id, int(result[STEP]), float(result[M.ACCURACY]))

    def finish(self, trial: Any, result: dict[str, Any] | None, error: str | None = None) -> None:
        """Add a finished Ray trial to the study (once), rewrite the tables, print its line."""
        if trial.trial_id in self.recorded:
            return
        self.recorded.add(trial.trial_id)
        self.progress.running.pop(trial.trial_id, None)
        values = dict(trial.config)
        seen = self.rungs.pop(trial.trial_id, {"curve": []})
        result = result or {}
        if result.get(FINAL):
            attrs = json.loads(result[RECORD])
            state = attrs.get("state", M.FAILED)
        else:  # stopped by the scheduler after a rung, or its worker failed for good
            curve = seen["curve"]
            attrs = {"curve": curve, "compute": seen.get("compute", {})}
            with contextlib.suppress(ValueError):  # an invalid proposal fails in the trainable
                attrs["config"] = self.space.make_config(values).to_dict()
            metrics = {**seen.get("compute", {}), M.ACCURACY: curve[-1][1] if curve else float("nan")}
            if "started" in seen:
                metrics[M.WALL_SECONDS] = time.time() - float(seen["started"])
            if curve:
                metrics[M.STEPS] = float(curve[-1][0])
            attrs["metrics"] = metrics
            if error is not None:
                state, attrs["reason"], attrs["error"] = M.FAILED, error, "WorkerError"
            else:
                state = M.PRUNED
                attrs["reason"] = f"pruned by {self.pruner} at step {curve[-1][0] if curve else 0}"
            attrs["state"] = state
        for key in (*PLACE, "started"):
            if key in result:
                attrs[key] = result[key]
            elif key in seen:
                attrs[key] = seen[key]
        attrs["ray_trial_id"] = trial.trial_id
        attrs["backend"] = "ray"
        self.add(values, attrs, state)

    def add(self, values: dict[str, Any], attrs: dict[str, Any], state: str) -> None:
        """Store one finished trial in the study, rewrite the tables, print its line."""
        self.trial_seconds += float(attrs.get("metrics", {}).get(M.WALL_SECONDS, 0.0) or 0.0)
        fixed = optuna.trial.FixedTrial(values)
        self.space.suggest(fixed)  # the distributions of the active parameters (define-by-run)
        self.log.log_error(len(self.study.get_trials(deepcopy=False)), attrs)  # the number add_trial gives
        objective = None
        if state == M.COMPLETE:
            objective = [float(attrs["metrics"][m]) for m in self.space.metrics]
        started = attrs.pop("started", None)
        now = _dt.datetime.now()
        frozen = optuna.trial.FrozenTrial(
            number=0, trial_id=0, value=None, values=objective,
            state={M.COMPLETE: optuna.trial.TrialState.COMPLETE, M.PRUNED: optuna.trial.TrialState.PRUNED}.get(
                state, optuna.trial.TrialState.FAIL),
            datetime_start=_dt.datetime.fromtimestamp(float(started)) if started else now, datetime_complete=now,
            params={k: _inside(values[k], d) for k, d in fixed.distributions.items()}, distributions=fixed.distributions,
            user_attrs=attrs, system_attrs={}, intermediate_values={int(s): float(a) for s, a in attrs.get("curve", [])},
        )  # fmt: skip
        self.study.add_trial(frozen)
        added = self.study.get_trials(deepcopy=False)[-1]
        self.log(self.study, added)  # tables, progress line, failure policy


def _inside(value: Any, dist: optuna.distributions.BaseDistribution) -> Any:
    """``value`` clipped into ``dist``: an RL grid point computed in floating point (``1e-2`` as
    ``0.010000000000000004``) may lie a rounding error outside, which a stored trial may not."""
    if isinstance(dist, (optuna.distributions.FloatDistribution, optuna.distributions.IntDistribution)):
        return type(value)(min(max(value, dist.low), dist.high))
    return value


_ACTIVE: _Driver | None = None


def _driver() -> _Driver:
    if _ACTIVE is None:  # pragma: no cover - Tune calls these objects only while a search runs
        raise RuntimeError("no Ray search is running in this process")
    return _ACTIVE


def _place(runner: TrialRunner) -> dict[str, Any]:
    """Where and when a trial runs (recorded with it)."""
    from attn_search.trainer import resolve_device

    return {
        "node": ray.get_runtime_context().get_node_id(),
        "node_ip": ray.util.get_node_ip_address(),
        "hostname": socket.gethostname(),
        "device": str(resolve_device(runner.device)),
        "started": time.time(),
    }


def _trainable(params: dict[str, Any], runner: TrialRunner) -> None:
    """One Tune trial: run the proposal, report each rung, then a final result with the record."""
    place = _place(runner)

    def on_rung(step: int, accuracy: float, compute: dict[str, float]) -> bool:
        if step >= runner.budget.steps:
            return False  # the final result follows at once; no scheduler may stop the trial before it
        tune.report({STEP: step, M.ACCURACY: accuracy, **compute, FINAL: False, **place})
        return False  # the scheduler decides, on the driver

    outcome = runner.run(dict(params), on_rung=on_rung)  # a trial that raises gives a failed outcome
    final: dict[str, Any] = {FINAL: True, "state": outcome.state, **place}
    final[STEP] = int(outcome.attrs.get("metrics", {}).get(M.STEPS, 0) or 0)
    final[RECORD] = json.dumps(outcome.attrs, default=float)
    if outcome.values is not None:
        final.update(zip(runner.space.metrics, outcome.values, strict=True))
    tune.report(final)


class _Searcher(OptunaSearch):  # type: ignore[misc]
    """OptunaSearch telling pruned and failed trials as such, and stopping at the deadline."""

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:  # type: ignore[override]
        active = _ACTIVE
        if active is not None and (
            active.log.aborted is not None or (active.deadline is not None and time.time() > active.deadline)
        ):
            return str(Searcher.FINISHED)
        return super().suggest(trial_id)  # type: ignore[no-any-return]

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        if result.get(FINAL) or not isinstance(self.metric, str) or self.metric not in result:
            return
        self._ot_trials[trial_id].report(float(result[self.metric]), int(result[STEP]))

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        ot_trial = self._ot_trials[trial_id]
        result = result or {}
        state, values = optuna.trial.TrialState.PRUNED, None
        if error or (result.get(FINAL) and result.get("state") == M.FAILED):
            state = optuna.trial.TrialState.FAIL
        elif result.get(FINAL) and result.get("state") == M.COMPLETE:
            metrics = self.metric if isinstance(self.metric, list) else [self.metric]
            state, values = optuna.trial.TrialState.COMPLETE, [float(result[m]) for m in metrics]
        if result.get(RECORD):
            constraints = json.loads(result[RECORD]).get("constraints")
            if constraints is not None:  # read by the sampler's constraints_func
                ot_trial.set_user_attr("constraints", constraints)
        self._ot_study.tell(ot_trial, values, state=state)  # type: ignore[attr-defined]
        self._completed_trials.add(trial_id)


class _MOASHAScheduler(FIFOScheduler):  # type: ignore[misc]
    """MO-ASHA as a Tune scheduler: stop a trial at a rung unless it ranks in the top ``1/eta``
    by non-dominated sorting of (accuracy, compute). The rule's state is the driver's."""

    def __init__(self, compute_names: list[str], max_step: int) -> None:
        super().__init__()
        self.compute_names = compute_names
        self.max_step = max_step

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> str:
        if result.get(FINAL) or M.ACCURACY not in result:
            return TrialScheduler.CONTINUE  # type: ignore[no-any-return]
        point = [float(result[M.ACCURACY]), *(float(result[m]) for m in self.compute_names)]
        keep = _driver().moasha.report(trial.trial_id, int(result[STEP]), point)
        keep = keep or int(result[STEP]) >= self.max_step  # a trial past its last step has finished
        return TrialScheduler.CONTINUE if keep else TrialScheduler.STOP  # type: ignore[no-any-return]


class _Recorder(tune.Callback):  # type: ignore[misc]
    """Feeds the driver: rungs, finished trials, retries."""

    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        _driver().started(trial)

    def on_trial_result(self, iteration: int, trials: list[Any], trial: Any, result: dict[str, Any],
                        **info: Any) -> None:  # fmt: skip
        if not result.get(FINAL) and M.ACCURACY in result:
            _driver().rung(trial.trial_id, result)

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        _driver().finish(trial, trial.last_result)

    def on_trial_recover(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        _driver().progress.note(f"  trial {trial.trial_id}: its worker died; retrying it ({MAX_FAILURES} tries)")
        _driver().rungs.pop(trial.trial_id, None)

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        error = trial.get_error() or "the trial's worker failed"
        line = next((ln for ln in reversed(str(error).strip().splitlines()) if ln.strip()), str(error))
        _driver().finish(trial, None, error=f"worker failed {MAX_FAILURES + 1} times: {line.strip()[:300]}")


class _AbortStopper(tune.Stopper):  # type: ignore[misc]
    """Stops every running trial once the failure policy stopped the search."""

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        return False

    def stop_all(self) -> bool:
        return _ACTIVE is not None and _ACTIVE.log.aborted is not None


def _probe(device: str) -> str:
    """Runs on a worker before any trial: the package imports there and the trial device exists."""
    import attn_search
    from attn_search.trainer import resolve_device

    return f"attn_search {attn_search.__version__} from {Path(attn_search.__file__).parent} on {resolve_device(device)}"


PROBE_TIMEOUT_S = 180.0


def _root_error(exc: BaseException) -> str:
    """The innermost ``Type: message`` line of a Ray error (Ray wraps a worker's exception and its
    traceback in text of its own, whose first line is generic)."""
    cause = getattr(exc, "cause", None) or exc
    lines = [ln.strip() for ln in str(cause).splitlines()]
    errors = [ln for ln in lines if re.match(r"^[A-Za-z_][\w.]*(Error|Exception): ", ln)]
    return errors[-1][:300] if errors else describe(cause)


def check_workers(per_trial: dict[str, float], device: str, progress: Progress) -> None:
    """Run :func:`_probe` as one Ray task with a trial's resources, so that a worker environment
    that cannot import or run the package stops the search in seconds with the worker's error,
    instead of every trial failing (and being retried) in silence."""
    probe = ray.remote(_probe).options(num_cpus=per_trial["cpu"], num_gpus=per_trial["gpu"], max_retries=0)
    try:
        where = ray.get(probe.remote(device), timeout=PROBE_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        raise SearchAborted(
            f"no Ray worker with {per_trial['cpu']:g} CPU(s) and {per_trial['gpu']:g} GPU(s) ran a probe task in "
            f"{PROBE_TIMEOUT_S:.0f} s: check the cluster's free resources (ray status)"
        ) from None
    except Exception as exc:
        raise SearchAborted(f"Ray workers cannot run attn_search: {_root_error(exc)}") from exc
    progress.note(f"  Ray workers run {where}")


def _scheduler(pruner: str, space: SearchSpace, *, eta: float, steps: int, grace: int) -> Any:
    if pruner == "moasha":
        return _MOASHAScheduler(list(space.metrics[1:]), steps)
    if pruner == "asha":
        # stop_last_trials=False: Ray's default stops every trial at max_t, before its final result
        return ASHAScheduler(time_attr=STEP, metric=M.ACCURACY, mode="max", max_t=steps, grace_period=max(1, grace),
                             reduction_factor=eta, stop_last_trials=False)  # fmt: skip
    if pruner == "median":
        return MedianStoppingRule(time_attr=STEP, metric=M.ACCURACY, mode="max", grace_period=max(1, grace),
                                  min_samples_required=3)  # fmt: skip
    return FIFOScheduler()


def connect(opts: SearchOptions) -> dict[str, float]:
    """Start a local Ray instance, or join ``--address``; returns the cluster's resources."""
    kwargs: dict[str, Any] = {"logging_level": "ERROR", "log_to_driver": False, "ignore_reinit_error": True}
    if opts.address:
        kwargs["address"] = opts.address
        _check_reachable(opts.address)
    else:
        kwargs["include_dashboard"] = False  # nothing of ours listens beyond what Ray needs
    try:
        ray.init(**kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = " (token auth: set RAY_AUTH_MODE=token and the cluster's token, see README)" if opts.address else ""
        raise UsageError(f"--address {opts.address}: cannot join the Ray cluster: {first}{hint}") from exc
    resources: dict[str, float] = ray.cluster_resources()
    return resources


def _check_reachable(address: str) -> None:
    """Fail in seconds on a HOST:PORT nobody listens on (``ray.init`` retries for minutes)."""
    if address == "auto" or address.startswith("ray://"):
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"--address {address!r} is invalid: use auto or HOST:PORT (e.g. 10.0.0.5:6379)")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as exc:
        raise UsageError(f"--address {address}: cannot join the Ray cluster: nothing answers there ({exc})") from exc


def _per_trial_resources(opts: SearchOptions, resources: dict[str, float]) -> dict[str, float]:
    gpus = opts.gpus_per_trial
    if gpus is None:
        gpus = 1.0 if resources.get("GPU", 0) >= 1 and opts.device != "cpu" else 0.0
    if opts.device == "cuda" and (gpus <= 0 or resources.get("GPU", 0) <= 0):
        raise UsageError(
            "--device cuda: the Ray cluster has no GPU for trials (give --gpus-per-trial, or --device cpu)"
        )
    largest = max((n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")), default=0.0)
    if opts.cpus_per_trial > largest:
        raise UsageError(
            f"--cpus-per-trial {opts.cpus_per_trial}: no node of the cluster has that many (largest: {largest:g})"
        )
    if gpus > resources.get("GPU", 0):
        raise UsageError(f"--gpus-per-trial {gpus:g}: the cluster has {resources.get('GPU', 0):g} GPU(s)")
    return {"cpu": opts.cpus_per_trial, "gpu": gpus}


def run_ray(
    opts: SearchOptions, *, study: optuna.Study, outputs: RunOutputs, progress: Progress, runner: TrialRunner,
    sampler: optuna.samplers.BaseSampler, pruner: str, moasha: MOASHA, trials: int, time_budget: float | None,
    out: Path, log: TrialLog,
) -> float:  # fmt: skip
    """Run (or restore and finish) the search as a Ray Tune experiment; returns seconds spent in trials."""
    global _ACTIVE
    resources = connect(opts)
    try:
        per_trial = _per_trial_resources(opts, resources)
        check_workers(per_trial, opts.device, progress)
        runner.deadline = None if time_budget is None else time.time() + time_budget
        recorded = {
            t.user_attrs["ray_trial_id"] for t in study.get_trials(deepcopy=False) if "ray_trial_id" in t.user_attrs
        }
        _ACTIVE = _Driver(study=study, outputs=outputs, progress=progress, space=runner.space, pruner=pruner,
                          moasha=moasha, deadline=runner.deadline, log=log, recorded=recorded)  # fmt: skip
        trainable = tune.with_resources(tune.with_parameters(_trainable, runner=runner), per_trial)
        path = out.resolve() / EXPERIMENT
        if opts.resume and tune.Tuner.can_restore(str(path)):
            tuner = tune.Tuner.restore(str(path), trainable, resume_unfinished=True, resume_errored=False)
        else:
            if opts.resume:
                progress.note(f"  {path} holds no Ray experiment to restore: starting one for the remaining trials")
            tuner = _new_tuner(opts, trainable, runner, sampler, pruner, trials - count_finished(study), out)
        tuner.fit()
        return _driver().trial_seconds
    finally:
        _ACTIVE = None
        ray.shutdown()


def _trial_dirname(trial: Any) -> str:
    return f"trial_{trial.trial_id}"


def _new_tuner(
    opts: SearchOptions, trainable: Any, runner: TrialRunner, sampler: optuna.samplers.BaseSampler, pruner: str,
    n_trials: int, out: Path,
) -> Any:  # fmt: skip
    space = runner.space
    modes = ["max" if d == M.MAXIMIZE else "min" for d in space.directions]
    searcher = _Searcher(
        space=space.suggest, metric=list(space.metrics) if len(modes) > 1 else space.metrics[0],
        mode=modes if len(modes) > 1 else modes[0], sampler=sampler,
        points_to_evaluate=[dict(v) for v in opts.enqueue] if opts.enqueue else None,
    )  # fmt: skip
    rung_steps = runner.budget.rung_steps()
    scheduler = _scheduler(pruner, space, eta=opts.eta, steps=runner.budget.steps,
                           grace=rung_steps[1] if len(rung_steps) > 1 else rung_steps[0])  # fmt: skip
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=max(1, n_trials),
            max_concurrent_trials=opts.max_concurrent,
            # a fresh actor per trial re-imports torch and warms up again: 2-3 s a trial on 2 cores
            reuse_actors=True,
            trial_dirname_creator=_trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=EXPERIMENT,
            storage_path=str(out.resolve()),
            verbose=0,
            callbacks=[_Recorder()],
            failure_config=tune.FailureConfig(max_failures=MAX_FAILURES),
            stop=_AbortStopper(),
        ),
    )


def _run_task(runner: TrialRunner, values: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """One RL proposal as a Ray task: the trial's attributes (with its place) and its state."""
    place = _place(runner)
    outcome = runner.run(dict(values))
    attrs = {**outcome.attrs, **place, "backend": "ray"}
    if outcome.values is not None:
        attrs.setdefault("metrics", {}).update(zip(runner.space.metrics, outcome.values, strict=True))
    return attrs, outcome.state


class AgentBatches:
    """``run_batch`` for the RL agent (:func:`attn_search.rl.run_agent`): a vector step's proposals
    run as concurrent Ray tasks (``max_retries`` re-runs one whose worker died) and are recorded in
    the study as they finish. Tune is not used here: the agent, not a Tune searcher, proposes, and
    it needs every proposal's full-budget result as its reward (no early stopping)."""

    def __init__(self, driver: _Driver, runner: TrialRunner, per_trial: dict[str, float], n_envs: int,
                 trials: int) -> None:  # fmt: skip
        self.driver = driver
        self.runner = runner
        self.n_envs = n_envs
        self.trials = trials
        self.remote = ray.remote(_run_task).options(
            num_cpus=per_trial["cpu"], num_gpus=per_trial["gpu"], max_retries=MAX_FAILURES, retry_exceptions=False
        )

    def __call__(self, proposals: list[dict[str, Any]]) -> list[dict[str, float] | None]:
        from attn_search.rl import BudgetReached

        left = self.trials - count_finished(self.driver.study)
        over_time = self.driver.deadline is not None and time.time() > self.driver.deadline
        if left <= 0 or over_time or self.driver.log.aborted is not None:
            raise BudgetReached
        batch = proposals[:left]
        runner = ray.put(self.runner)
        refs = [self.remote.remote(runner, values) for values in batch]
        for ref, values in zip(refs, batch, strict=True):
            with contextlib.suppress(ValueError):
                self.driver.progress.trial_started(ref.hex()[:8], self.driver.space.make_config(values))
        results: dict[Any, dict[str, float] | None] = {}
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            values = batch[refs.index(ready[0])]
            try:
                attrs, state = ray.get(ready[0])
            except ray.exceptions.RayError as exc:
                line = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
                reason = f"worker failed {MAX_FAILURES + 1} times: {line}"
                attrs, state = {"state": M.FAILED, "reason": reason, "error": "WorkerError"}, M.FAILED
            self.driver.progress.running.pop(ready[0].hex()[:8], None)
            self.driver.add(values, attrs, state)
            results[ready[0]] = attrs.get("metrics") if state == M.COMPLETE else None
        return [results[r] for r in refs] + [None] * (len(proposals) - len(batch))


@contextlib.contextmanager
def agent_batches(
    opts: SearchOptions, *, study: optuna.Study, outputs: RunOutputs, progress: Progress, runner: TrialRunner,
    trials: int, time_budget: float | None, log: TrialLog,
) -> Iterator[AgentBatches]:  # fmt: skip
    """Connect to Ray and yield the RL agent's batch evaluator (one env per concurrent trial)."""
    resources = connect(opts)
    try:
        per_trial = _per_trial_resources(opts, resources)
        check_workers(per_trial, opts.device, progress)
        runner.deadline = None if time_budget is None else time.time() + time_budget
        slots = int(resources.get("CPU", 1) // per_trial["cpu"])
        if per_trial["gpu"] > 0:
            slots = min(slots, int(resources.get("GPU", 0) // per_trial["gpu"]))
        n_envs = max(1, min(opts.max_concurrent or slots, slots or 1))
        driver = _Driver(study=study, outputs=outputs, progress=progress, space=runner.space, pruner="none",
                         moasha=MOASHA(runner.space.directions), deadline=runner.deadline, log=log)  # fmt: skip
        progress.note(f"  {opts.strategy} agent acting in {n_envs} environment(s): {n_envs} trial(s) at a time on Ray")
        yield AgentBatches(driver, runner, per_trial, n_envs, trials)
    finally:
        ray.shutdown()
