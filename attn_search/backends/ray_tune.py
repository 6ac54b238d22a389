"""The Ray Tune backend: trials spread over local cores, the GPUs of one machine or a cluster.

Imported only by ``--backend ray`` (Ray is an optional extra). Ray Tune stays the distributed
engine: it places trials on nodes by their resources, restarts a trial whose worker or node died
(``FailureConfig``), keeps the experiment in ``RUN_DIR/ray`` (``Tuner.restore`` continues it on
``--resume``) and feeds its loggers. What the search loop owns stays in the loop: the proposals
come from the run's strategy through :class:`_Searcher`, which hands Tune the jobs the loop
submitted (and no suggestion until there is one); early stopping is the loop's rule, asked by
:class:`_RungScheduler` at every rung; finished trials flow back as events (:class:`_Callback`).

``Tuner.fit`` runs in a thread of its own, so the loop keeps one shape whichever backend runs the
trials. Objects Tune pickles into its experiment (searcher, scheduler, callback, stopper) hold no
live state: they reach the running backend through the module-level :data:`_ACTIVE`. One Ray
search per process at a time.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import os
import queue
import re
import socket
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune.schedulers import FIFOScheduler, TrialScheduler
from ray.tune.search import Searcher

from attn_search.backends.base import (
    BackendOptions,
    Event,
    Finished,
    Job,
    Note,
    OnRung,
    OnStart,
    TrialOutcome,
    TrialRunner,
)
from attn_search.engine import metrics as M
from attn_search.errors import SearchAborted, UsageError
from attn_search.search.failures import describe

EXPERIMENT = "ray"
"""The Tune experiment's folder inside the run dir."""
NUMBER = "_trial"
"""Config key that carries the study's trial number through Tune (stripped before the trial runs)."""
MEMBERS = "_members"
"""Config key of a population slot: JSON ``[[number, values], ...]`` (``NUMBER`` is the first's)."""
STEP = "step"
FINAL = "final"
RECORD = "record"
PLACE = ("node", "node_ip", "hostname", "device", "started")
MAX_FAILURES = 3
"""Retries of a trial whose worker died (``FailureConfig``)."""
PROBE_TIMEOUT_S = 180.0
RUNG_TIMEOUT_S = 600.0
"""A population trial waits this long for the driver's answer at a rung, then trains on."""

# Tune snapshots its trial table every 10+ s by default; a snapshot costs milliseconds.
os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
# Tune's console table and per-trial logs would bury the progress lines (and cost time per result).
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
# Results carry no fixed metric: what a trial means is in its final record.
os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")


_ACTIVE: RayBackend | None = None


def _backend() -> RayBackend:
    if _ACTIVE is None:  # pragma: no cover - Tune calls these objects only while a search runs
        raise RuntimeError("no Ray search is running in this process")
    return _ACTIVE


class RayBackend:
    """Trials as Ray Tune trials (see the module docstring)."""

    name = "ray"

    def __init__(self, options: BackendOptions, *, run_dir: Path, resume: bool) -> None:
        self.options = options
        self.path = run_dir.resolve() / EXPERIMENT
        self.resume = resume
        self._slots = 1
        self._gpus_per_trial = 0.0
        self._pending: collections.deque[dict[str, Any]] = collections.deque()
        self._in_flight: dict[int, int] = {}  # trial number -> its slot (the first member's number)
        self._events: queue.Queue[Event] = queue.Queue()
        self._rungs: dict[str, dict[str, Any]] = {}
        self._finishing = False
        self._stop_all = False
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._on_rung: OnRung = lambda number, step, accuracy, compute: False
        self._on_start: OnStart = lambda number, config: None
        self._runner: TrialRunner | None = None
        self._ask: Callable[[int], Job | None] | None = None
        self._busy: set[int] = set()  # slots whose Tune trial has not ended (a population refills its own)
        self._refills: dict[int, list[int]] = {}  # a population's slot -> the trials refilled into it
        self._reported: set[int] = set()  # members whose outcome came before their population ended

    # -- the loop's side -----------------------------------------------------------------------
    def start(self, runner: TrialRunner, *, on_rung: OnRung, on_start: OnStart,
              ask: Callable[[int], Job | None] | None = None, record: Any = None) -> None:  # fmt: skip
        global _ACTIVE
        self._runner, self._on_rung, self._on_start = runner, on_rung, on_start
        self._ask = ask
        resources = connect(self.options)
        per_trial = per_trial_resources(self.options, resources)
        self._gpus_per_trial = per_trial["gpu"]
        slots = int(resources.get("CPU", 1) // per_trial["cpu"])
        if per_trial["gpu"] > 0:
            slots = min(slots, int(resources.get("GPU", 0) // per_trial["gpu"]))
        self._slots = max(1, min(self.options.max_concurrent or slots, slots or 1))
        where = check_workers(per_trial, self.options.device)
        self._events.put(Note(f"  Ray: {self._slots} trial(s) at a time; workers run {where}"))
        _ACTIVE = self
        self._board = _RungBoard.remote()  # type: ignore[attr-defined]
        threading.Thread(target=self._serve_rungs, name="ray-rungs", daemon=True).start()
        trainable = tune.with_resources(tune.with_parameters(_trainable, runner=runner, board=self._board), per_trial)
        if self.resume and tune.Tuner.can_restore(str(self.path)):
            # the unfinished trials of the old session are skipped: the loop runs them again as jobs
            tuner = tune.Tuner.restore(str(self.path), trainable, resume_unfinished=False, resume_errored=False)
            self._events.put(Note(f"  Ray: restored the Tune experiment in {self.path}"))
        else:
            tuner = self._new_tuner(trainable)
        self._thread = threading.Thread(target=self._fit, args=(tuner,), name="ray-tune", daemon=True)
        self._thread.start()

    def slots(self) -> int:
        return self._slots

    def device_kind(self) -> str:
        return "cuda" if self._gpus_per_trial > 0 and self.options.device != "cpu" else "cpu"

    def capacity(self) -> int:
        return max(0, self._slots - len(self._busy))

    def submit(self, jobs: Sequence[Job]) -> None:
        slot = jobs[0].number
        self._busy.add(slot)
        self._in_flight.update((job.number, slot) for job in jobs)
        if len(jobs) == 1:  # one trial: Tune's scheduler stops it at a rung
            self._pending.append({**jobs[0].values, NUMBER: slot})
        else:  # a population: the trial asks the loop's rule for its members itself (_RungBoard)
            self._pending.append({NUMBER: slot, MEMBERS: json.dumps([[job.number, job.values] for job in jobs])})

    def wait(self, timeout: float) -> list[Event]:
        events: list[Event] = []
        try:
            events.append(self._events.get(timeout=timeout))
            while True:
                events.append(self._events.get_nowait())
        except queue.Empty:
            pass
        for event in events:
            if isinstance(event, Finished):
                self._in_flight.pop(event.number, None)
        if not events and self._error is not None:
            raise RuntimeError(f"Ray Tune stopped: {describe(self._error)}") from self._error
        if not events and self._in_flight and self._thread is not None and not self._thread.is_alive():
            raise RuntimeError("Ray Tune stopped while trials were running")
        return events

    def close(self) -> None:
        global _ACTIVE
        self._finishing = True
        self._stop_all = bool(self._in_flight)  # the loop gave up on them (interrupt, failure policy)
        self._pending.clear()
        if self._thread is not None:
            self._thread.join(timeout=60)
        _ACTIVE = None
        ray.shutdown()

    # -- Tune's side -----------------------------------------------------------------------------
    def _fit(self, tuner: Any) -> None:
        try:
            tuner.fit()
        except BaseException as exc:  # reported to the loop by wait()
            self._error = exc

    def _new_tuner(self, trainable: Any) -> Any:
        return tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                search_alg=_Searcher(),
                scheduler=_RungScheduler(),
                num_samples=-1,  # the loop decides how many: the searcher says when it is finished
                # no max_concurrent_trials: the loop submits at most `slots` jobs at a time, and Tune's
                # ConcurrencyLimiter would restore the killed session's trials as still running
                # (they are skipped on restore without being told), and never suggest again
                # a fresh actor per trial re-imports torch and warms up again: 2-3 s a trial on 2 cores
                reuse_actors=True,
                trial_dirname_creator=lambda trial: f"trial_{trial.trial_id}",
            ),
            run_config=tune.RunConfig(
                name=EXPERIMENT,
                storage_path=str(self.path.parent),
                verbose=0,
                callbacks=[_Callback()],
                failure_config=tune.FailureConfig(max_failures=MAX_FAILURES),
                stop=_Stopper(),
            ),
        )

    def next_job(self, trial_id: str) -> dict[str, Any] | str | None:
        if self._finishing:
            return str(Searcher.FINISHED)
        if not self._pending:
            return None  # Tune asks again later
        return self._pending.popleft()

    def started(self, trial: Any) -> None:
        if NUMBER not in trial.config or self._runner is None:
            return
        for number, values in _members(trial.config):
            try:
                config = self._runner.space.make_config(values)
            except ValueError:
                continue
            self._on_start(number, config)

    def _serve_rungs(self) -> None:
        """Answers population trials' questions (see :class:`_RungBoard`): their rungs with the
        loop's rule, a freed slot with the loop's next job (a refill), and a member's outcome as
        soon as it ends (recorded at once, so the strategy hears it before it proposes again)."""
        while not self._finishing:
            try:
                asked = ray.get(self._board.take.remote(1.0), timeout=30)  # waits up to 1 s for a question
            except Exception:  # Ray is shutting down
                return
            for key, (kind, payload) in asked.items():
                try:
                    answer = self._answer(kind, payload)
                except Exception as exc:  # the thread must live on: every population waits on it
                    self.note(f"  warning: a population's {kind} question failed in the driver: {describe(exc)}")
                    answer = [False] * len(payload[1]) if kind == "rungs" else None if kind == "refill" else True
                self._board.answer.remote(key, answer)

    def _answer(self, kind: str, payload: Any) -> Any:
        if kind == "rungs":
            step, rungs = payload
            return [self._on_rung(number, step, accuracy, compute) for number, accuracy, compute in rungs]
        if kind == "refill":
            slot = int(payload)
            job = self._ask(slot) if self._ask is not None and not self._finishing else None
            if job is None:
                return None
            self._in_flight[job.number] = slot
            self._refills.setdefault(slot, []).append(job.number)
            if self._runner is not None:
                with contextlib.suppress(ValueError):
                    self._on_start(job.number, self._runner.space.make_config(job.values))
            return [job.number, job.values]
        number, record = payload  # "done"
        self._reported.add(int(number))
        self._events.put(Finished(int(number), _outcome(record)))
        return True

    def rung(self, trial: Any, result: dict[str, Any]) -> bool:
        """A trial's rung: remember it (for a trial stopped here) and ask the loop's rule."""
        seen = self._rungs.setdefault(trial.trial_id, {"curve": []})
        step, accuracy = int(result[STEP]), float(result[M.ACCURACY])
        seen["curve"].append((step, accuracy))
        seen["compute"] = {m: float(result[m]) for m in (M.FLOPS, M.PARAMS, M.LATENCY_MS, M.PEAK_MEM_MB) if m in result}
        seen.update({k: result[k] for k in PLACE if k in result})
        return self._on_rung(int(trial.config[NUMBER]), step, accuracy, seen["compute"])

    def finished(self, trial: Any, result: dict[str, Any] | None, error: str | None = None) -> None:
        seen = self._rungs.pop(trial.trial_id, {"curve": []})
        if NUMBER not in trial.config:
            return
        result = result or {}
        records = json.loads(result[RECORD]) if result.get(FINAL) else []
        members = [number for number, _ in _members(trial.config)]
        members += self._refills.pop(int(trial.config[NUMBER]), [])
        # each record names its trial; a one-trial record does not need to
        by_number = {int(r.get("number", members[i])): r for i, r in enumerate(records[: len(members)])}
        for number in members:
            if number in self._reported:
                self._reported.discard(number)
                continue  # recorded when it ended
            record = by_number.get(number)
            outcome = _outcome(record) if record is not None else self._unfinished(seen, error)
            for key in PLACE:
                if key in result:
                    outcome.attrs[key] = result[key]
                elif key in seen:
                    outcome.attrs[key] = seen[key]
            outcome.attrs["ray_trial_id"] = trial.trial_id
            self._events.put(Finished(int(number), outcome))
        self._busy.discard(int(trial.config[NUMBER]))

    def lost_refills(self, trial: Any) -> None:
        """A population's worker died: the retry trains its own members again, not the trials
        refilled into it, which fail (with why) instead of staying live with no worker."""
        if NUMBER not in trial.config:
            return
        for number in self._refills.pop(int(trial.config[NUMBER]), []):
            if number in self._reported:
                continue
            reason = "its population's Ray worker died after it was refilled into it"
            self._events.put(Finished(number, TrialOutcome(M.FAILED, {"reason": reason, "state": M.FAILED})))

    def _unfinished(self, seen: dict[str, Any], error: str | None) -> TrialOutcome:
        """A trial that gave no final result: stopped by the scheduler after a rung, or its worker
        failed for good (for a population, every member)."""
        curve = seen["curve"]
        attrs: dict[str, Any] = {"curve": curve, "compute": seen.get("compute", {})}
        metrics = {**seen.get("compute", {}), M.ACCURACY: curve[-1][1] if curve else float("nan")}
        if "started" in seen:
            metrics[M.WALL_SECONDS] = time.time() - float(seen["started"])
        if curve:
            metrics[M.STEPS] = float(curve[-1][0])
        attrs["metrics"] = metrics
        if error is not None:
            state = M.FAILED
            attrs.update(reason=error, error="WorkerError")
        else:
            state = M.PRUNED
            attrs["reason"] = f"stopped early at step {curve[-1][0] if curve else 0}"
        attrs["state"] = state
        return TrialOutcome(state, attrs)

    def note(self, text: str) -> None:
        self._events.put(Note(text))


def _outcome(record: dict[str, Any]) -> TrialOutcome:
    values = tuple(record["values"]) if record.get("values") is not None else None
    return TrialOutcome(record["state"], record["attrs"], values)


def _record(outcome: TrialOutcome, number: int) -> dict[str, Any]:
    return {"number": number, "state": outcome.state, "attrs": outcome.attrs, "values": outcome.values}


def _values(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k != NUMBER}


def _members(config: dict[str, Any]) -> list[tuple[int, dict[str, Any]]]:
    """The trials of a Tune trial's config: ``(number, values)``, one, or a population's."""
    if MEMBERS in config:
        return [(int(number), values) for number, values in json.loads(config[MEMBERS])]
    return [(int(config[NUMBER]), _values(config))]


def _place(runner: TrialRunner) -> dict[str, Any]:
    """Where and when a trial runs (recorded with it)."""
    from attn_search.engine.trainer import resolve_device

    return {
        "node": ray.get_runtime_context().get_node_id(),
        "node_ip": ray.util.get_node_ip_address(),
        "hostname": socket.gethostname(),
        "device": str(resolve_device(runner.device)),
        "started": time.time(),
    }


def _trainable(config: dict[str, Any], runner: TrialRunner, board: Any) -> None:
    """One Tune trial: run the job, report each rung (the driver's scheduler decides), then a final
    result carrying the whole outcome. A population slot asks the driver's rule about its members
    through ``board`` at each rung, and its final result carries every member's outcome."""
    place = _place(runner)
    if MEMBERS in config:
        _population_trainable(config, runner, board, place)
        return

    def on_rung(step: int, accuracy: float, compute: dict[str, float]) -> bool:
        if step >= runner.budget.steps:
            return False  # the final result follows at once; no scheduler may stop the trial before it
        tune.report({STEP: step, M.ACCURACY: accuracy, **compute, FINAL: False, **place})
        return False

    outcome = runner.run(_values(config), on_rung=on_rung)  # a trial that raises gives a failed outcome
    record = {"state": outcome.state, "attrs": outcome.attrs, "values": outcome.values}
    step = int(outcome.attrs.get("metrics", {}).get(M.STEPS, 0) or 0)
    tune.report({FINAL: True, STEP: step, RECORD: json.dumps([record], default=float), **place})


def _population_trainable(config: dict[str, Any], runner: TrialRunner, board: Any, place: dict[str, Any]) -> None:
    members = _members(config)
    numbers = [number for number, _ in members]  # member i is trial numbers[i]; refills append
    actor = ray.get_runtime_context().get_actor_id()
    asked = itertools.count()

    def ask(kind: str, payload: Any) -> Any:
        """A question to the driver (:class:`_RungBoard`); ``None`` if it does not answer in time."""
        key = f"{actor}:{numbers[0]}:{next(asked)}"
        try:
            return ray.get(board.ask.remote(key, kind, payload), timeout=RUNG_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            return None  # the driver is gone or stuck: train on, the final result says it all

    def on_rungs(rungs: Sequence[tuple[int, int, float, dict[str, float]]]) -> list[bool]:
        by_step: dict[int, list[int]] = {}
        for j, (_, step, _, _) in enumerate(rungs):  # members refilled later are at other steps
            by_step.setdefault(step, []).append(j)
        stops = [False] * len(rungs)
        for step, js in by_step.items():
            answer = ask("rungs", (step, [(numbers[rungs[j][0]], rungs[j][2], rungs[j][3]) for j in js]))
            for j, stop in zip(js, answer or [False] * len(js), strict=True):
                stops[j] = stop
        top = max(step for _, step, _, _ in rungs)
        if top < runner.budget.steps:  # progress for Tune's loggers (its scheduler ignores it)
            tune.report({STEP: top, "best_accuracy": max(acc for _, _, acc, _ in rungs), "members": len(rungs),
                         FINAL: False, **place})  # fmt: skip
        return stops

    def refill() -> tuple[int, dict[str, Any]] | None:
        got = ask("refill", numbers[0])
        if not got:
            return None
        numbers.append(int(got[0]))
        return int(got[0]), dict(got[1])

    def on_outcome(i: int, outcome: TrialOutcome) -> None:
        record = _record(outcome, numbers[i])
        record["attrs"] = {**record["attrs"], **place, "ray_trial_id": tune.get_context().get_trial_id()}
        ask("done", (numbers[i], json.loads(json.dumps(record, default=float))))

    outcomes = runner.run_many([values for _, values in members], on_rungs=on_rungs, refill=refill,
                               on_outcome=on_outcome)  # fmt: skip
    records = [_record(o, numbers[i]) for i, o in enumerate(outcomes)]
    step = max(int(o.attrs.get("metrics", {}).get(M.STEPS, 0) or 0) for o in outcomes)
    tune.report({FINAL: True, STEP: step, RECORD: json.dumps(records, default=float), **place})


@ray.remote(num_cpus=0)
class _RungBoard:
    """Where population trials ask the driver: the early-stopping rule about their members (Tune's
    scheduler can only stop a whole trial, and its answer never reaches the trainable), the next
    job for a freed slot (a refill), and a member's outcome as it ends. A trial puts its question
    and waits; the backend's thread takes the questions and answers (one round trip each)."""

    def __init__(self) -> None:
        self._asked: dict[str, tuple[str, Any]] = {}
        self._answers: dict[str, Any] = {}
        self._ready: dict[str, asyncio.Event] = {}
        self._new = asyncio.Event()

    async def ask(self, key: str, kind: str, payload: Any) -> Any:
        self._ready[key] = asyncio.Event()
        self._asked[key] = (kind, payload)
        self._new.set()
        await self._ready[key].wait()
        del self._ready[key]
        return self._answers.pop(key)

    async def take(self, wait_s: float) -> dict[str, tuple[str, Any]]:
        """The questions asked since the last call; waits up to ``wait_s`` for one (no busy polling)."""
        if not self._asked:
            self._new.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._new.wait(), wait_s)
        asked, self._asked = self._asked, {}
        return asked

    async def answer(self, key: str, answer: Any) -> None:
        self._answers[key] = answer
        if key in self._ready:
            self._ready[key].set()


class _Searcher(Searcher):  # type: ignore[misc]
    """Hands Tune the jobs the loop submitted; ``None`` (ask again later) while there is none."""

    def __init__(self) -> None:
        super().__init__()

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:  # type: ignore[override]
        return _backend().next_job(trial_id)

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        pass  # the loop tells the strategy (see _Callback)

    def save(self, checkpoint_path: str) -> None:
        Path(checkpoint_path).write_text("{}")  # no state: the run's study and strategy hold it

    def restore(self, checkpoint_path: str) -> None:
        pass


class _RungScheduler(FIFOScheduler):  # type: ignore[misc]
    """Asks the loop's early-stopping rule at every rung (one rule for every backend)."""

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> str:
        if result.get(FINAL) or M.ACCURACY not in result or NUMBER not in trial.config:
            return TrialScheduler.CONTINUE  # type: ignore[no-any-return]
        stop = _backend().rung(trial, result)
        return TrialScheduler.STOP if stop else TrialScheduler.CONTINUE  # type: ignore[no-any-return]


class _Stopper(tune.Stopper):  # type: ignore[misc]
    """Stops every running trial when the loop gives up on them (interrupt, failure policy)."""

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        return False

    def stop_all(self) -> bool:
        return _ACTIVE is not None and _ACTIVE._stop_all


class _Callback(tune.Callback):  # type: ignore[misc]
    """Feeds the backend's events: trial starts, finished trials, retries."""

    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        _backend().started(trial)

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        _backend().finished(trial, trial.last_result)

    def on_trial_recover(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        _backend().note(f"  trial {trial.config.get(NUMBER)}: its worker died; retrying it ({MAX_FAILURES} tries)")
        _backend()._rungs.pop(trial.trial_id, None)
        _backend().lost_refills(trial)

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        error = trial.get_error() or "the trial's worker failed"
        line = next((ln for ln in reversed(str(error).strip().splitlines()) if ln.strip()), str(error))
        _backend().finished(trial, None, error=f"worker failed {MAX_FAILURES + 1} times: {line.strip()[:300]}")


def connect(options: BackendOptions) -> dict[str, float]:
    """Start a local Ray instance, or join ``--address``; returns the cluster's resources."""
    kwargs: dict[str, Any] = {"logging_level": "ERROR", "log_to_driver": False, "ignore_reinit_error": True}
    if options.address:
        kwargs["address"] = options.address
        _check_reachable(options.address)
    else:
        kwargs["include_dashboard"] = False  # nothing of ours listens beyond what Ray needs
    try:
        ray.init(**kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = " (token auth: set RAY_AUTH_MODE=token and the cluster's token, see README)" if options.address else ""
        raise UsageError(f"--address {options.address}: cannot join the Ray cluster: {first}{hint}") from exc
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


def per_trial_resources(options: BackendOptions, resources: dict[str, float]) -> dict[str, float]:
    """CPUs and GPUs each trial reserves; ``UsageError`` when no node could ever run one."""
    gpus = options.gpus_per_trial
    if gpus is None:
        gpus = 1.0 if resources.get("GPU", 0) >= 1 and options.device != "cpu" else 0.0
    if options.device == "cuda" and (gpus <= 0 or resources.get("GPU", 0) <= 0):
        raise UsageError(
            "--device cuda: the Ray cluster has no GPU for trials (give --gpus-per-trial, or --device cpu)"
        )
    largest = max((n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")), default=0.0)
    if options.cpus_per_trial > largest:
        raise UsageError(
            f"--cpus-per-trial {options.cpus_per_trial}: no node of the cluster has that many (largest: {largest:g})"
        )
    if gpus > resources.get("GPU", 0):
        raise UsageError(f"--gpus-per-trial {gpus:g}: the cluster has {resources.get('GPU', 0):g} GPU(s)")
    return {"cpu": options.cpus_per_trial, "gpu": gpus}


def _probe(device: str) -> str:
    """Runs on a worker before any trial: the package imports there and the trial device exists."""
    import attn_search
    from attn_search.engine.trainer import resolve_device

    return f"attn_search {attn_search.__version__} from {Path(attn_search.__file__).parent} on {resolve_device(device)}"


def _root_error(exc: BaseException) -> str:
    """The innermost ``Type: message`` line of a Ray error (Ray wraps a worker's exception and its
    traceback in text of its own, whose first line is generic)."""
    cause = getattr(exc, "cause", None) or exc
    lines = [ln.strip() for ln in str(cause).splitlines()]
    errors = [ln for ln in lines if re.match(r"^[A-Za-z_][\w.]*(Error|Exception): ", ln)]
    return errors[-1][:300] if errors else describe(cause)


def check_workers(per_trial: dict[str, float], device: str) -> str:
    """Run :func:`_probe` as one Ray task with a trial's resources, so that a worker environment
    that cannot import or run the package stops the search in seconds with the worker's error,
    instead of every trial failing (and being retried) in silence. Returns what the worker saw."""
    probe = ray.remote(_probe).options(num_cpus=per_trial["cpu"], num_gpus=per_trial["gpu"], max_retries=0)
    try:
        return str(ray.get(probe.remote(device), timeout=PROBE_TIMEOUT_S))
    except ray.exceptions.GetTimeoutError:
        raise SearchAborted(
            f"no Ray worker with {per_trial['cpu']:g} CPU(s) and {per_trial['gpu']:g} GPU(s) ran a probe task in "
            f"{PROBE_TIMEOUT_S:.0f} s: check the cluster's free resources (ray status)"
        ) from None
    except Exception as exc:
        raise SearchAborted(f"Ray workers cannot run attn_search: {_root_error(exc)}") from exc
