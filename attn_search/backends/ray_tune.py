"""The Ray Tune backend: trials spread over local cores, the GPUs of one machine or a cluster.

Imported only by ``--backend ray`` (Ray is an optional extra). Ray Tune stays the distributed
engine: it places trials on nodes by their resources, restarts a trial whose worker or node died
(``FailureConfig``), keeps the experiment in ``RUN_DIR/ray`` (``Tuner.restore`` continues it on
``--resume``) and feeds its loggers.

Every Tune trial runs one slot (:class:`~attn_search.backends.base.SlotRun`: a population, a
single trial being a population of one) and speaks the local backend's event protocol, over one
channel each way through a :class:`_Channel` actor: the trial puts its events there and, when they
need an answer (a rung, a vacant seat), waits there for the loop's commands; the driver takes the
events in :meth:`RayBackend.wait` and hands back, at the next wait, the commands the loop gave.
What Tune itself reports (a trial ended, failed for good, or is retried) joins the same event
stream. Tune's own objects (searcher, stopper, callback), which it pickles into its experiment,
hold only the channel's name, derived from the run dir, so a restored experiment finds the new
session's channel: nothing is wired through a module global.

``Tuner.fit`` runs in a thread of its own, so the loop keeps one shape whichever backend runs the
trials.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import itertools
import json
import os
import pickle
import re
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ray
from ray import cloudpickle, tune
from ray.tune.search import Searcher

from attn_search.backends.base import (
    AtRung,
    BackendOptions,
    Event,
    Finished,
    Job,
    Note,
    SlotRun,
    Started,
    TrialOutcome,
    TrialRunner,
    Vacant,
)
from attn_search.engine import metrics as M
from attn_search.errors import SearchAborted, UsageError
from attn_search.search.failures import describe

EXPERIMENT = "ray"
"""The Tune experiment's folder inside the run dir."""
NUMBER = "_trial"
"""Config key that carries the slot's first trial number through Tune."""
MEMBERS = "_members"
"""Config key of a slot's jobs: JSON ``[[number, values], ...]``."""
STEP = "step"
FINAL = "final"
MAX_FAILURES = 3
"""Retries of a trial whose worker died (``FailureConfig``)."""
PROBE_TIMEOUT_S = 180.0
ANSWER_TIMEOUT_S = 600.0
"""A trial waits this long for the loop's commands at a rung or a vacant seat, then trains on
(the driver is gone or stuck: the trial's own events still say everything)."""

# Tune snapshots its trial table every 10+ s by default; a snapshot costs milliseconds.
os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
# Tune's console table and per-trial logs would bury the progress lines (and cost time per result).
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
# Results carry no fixed metric: what a trial means is in its events.
os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")


@dataclasses.dataclass(frozen=True)
class _TrialEnded:
    """Tune's word (driver side): the Tune trial of ``population`` ended, or failed for good (``error``)."""

    population: int
    error: str | None = None


@dataclasses.dataclass(frozen=True)
class _TrialRetried:
    """Tune's word: the worker of ``population``'s trial died and the trial runs again."""

    population: int


class RayBackend:
    """Slots as Ray Tune trials (see the module docstring)."""

    name = "ray"

    def __init__(self, options: BackendOptions, *, run_dir: Path, resume: bool) -> None:
        self.options = options
        self.path = run_dir.resolve() / EXPERIMENT
        self.resume = resume
        self._slots = 1
        self._gpus_per_trial = 0.0
        self._channel: Any = None
        self._channel_name = channel_name(self.path)
        self._notes: list[Event] = []
        self._in_flight: dict[int, int] = {}  # trial number -> its population (the slot's first trial)
        self._busy: set[int] = set()  # populations whose Tune trial has not ended
        self._refills: dict[int, list[int]] = {}  # a population -> the trials admitted into it
        self._commands: dict[str, list[tuple[Any, ...]]] = {}  # an answered batch's key -> the loop's commands
        self._rung_key: dict[int, str] = {}  # trial number -> the key of the batch its rung came in
        self._seat_key: dict[int, str] = {}  # population -> the key of the batch its vacant seats came in
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    # -- the loop's side -----------------------------------------------------------------------
    def start(self, runner: TrialRunner) -> None:
        resources = connect(self.options)
        per_trial = per_trial_resources(self.options, resources)
        self._gpus_per_trial = per_trial["gpu"]
        slots = int(resources.get("CPU", 1) // per_trial["cpu"])
        if per_trial["gpu"] > 0:
            slots = min(slots, int(resources.get("GPU", 0) // per_trial["gpu"]))
        self._slots = max(1, min(self.options.max_concurrent or slots, slots or 1))
        where = check_workers(per_trial, self.options.device)
        self._notes.append(Note(f"  Ray: {self._slots} trial(s) at a time; workers run {where}"))
        # Tune's restored objects carry the name they were pickled with: keep it with the experiment
        named = self.path / "channel"
        if self.resume and named.is_file():
            self._channel_name = named.read_text().strip()
        else:
            self.path.mkdir(parents=True, exist_ok=True)
            named.write_text(self._channel_name + "\n")
        self._channel = _Channel.options(name=self._channel_name).remote()  # type: ignore[attr-defined]
        trainable = tune.with_resources(tune.with_parameters(_trainable, runner=runner, channel=self._channel),
                                        per_trial)  # fmt: skip
        if self.resume and tune.Tuner.can_restore(str(self.path)):
            # the unfinished trials of the old session are skipped: the loop runs them again as jobs
            _unfinish(self.path)
            tuner = tune.Tuner.restore(str(self.path), trainable, resume_unfinished=False, resume_errored=False)
            self._notes.append(Note(f"  Ray: restored the Tune experiment in {self.path}"))
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
        population = jobs[0].number
        self._busy.add(population)
        self._in_flight.update((job.number, population) for job in jobs)
        self._channel.push_job.remote({NUMBER: population, MEMBERS: json.dumps([[j.number, j.values] for j in jobs])})

    def stop(self, number: int) -> None:
        key = self._rung_key.pop(number, None)
        if key in self._commands:
            self._commands[key].append(("stop", number))

    def admit(self, population: int, index: int, job: Job) -> None:
        key = self._seat_key.get(population)
        if key not in self._commands:
            raise RuntimeError(f"no vacant seat of population {population} is waiting for an answer")
        self._commands[key].append(("admit", index, job.number, job.values))
        self._in_flight[job.number] = population
        self._refills.setdefault(population, []).append(job.number)

    def wait(self, timeout: float) -> list[Event]:
        for key, commands in self._commands.items():  # the loop's answers to the last events
            self._channel.command.remote(key, commands)
        self._commands, self._rung_key, self._seat_key = {}, {}, {}
        events, self._notes = self._notes, []
        try:
            got = ray.get(self._channel.take.remote(0.0 if events else timeout), timeout=timeout + 60)
        except ray.exceptions.GetTimeoutError:
            got = []
        for key, batch in got:
            if key is not None:
                self._commands[key] = []  # the trial waits for an answer, even an empty one
            for event in batch:
                events += self._carry(event, key)
        if not events and self._error is not None:
            raise RuntimeError(f"Ray Tune stopped: {describe(self._error)}") from self._error
        if not events and self._in_flight and self._thread is not None and not self._thread.is_alive():
            raise RuntimeError("Ray Tune stopped while trials were running")
        return events

    def close(self) -> None:
        if self._channel is not None:
            # the searcher says it is finished (Tune waits for a trial until then); running trials
            # stop if the loop gave up on them (interrupt, failure policy)
            with contextlib.suppress(Exception):
                ray.get(self._channel.finish.remote(bool(self._in_flight)), timeout=30)
        if self._thread is not None:
            self._thread.join(timeout=60)
        ray.shutdown()

    # -- the events ------------------------------------------------------------------------------
    def _carry(self, event: Any, key: str | None) -> list[Event]:
        """What the loop hears of one event: a trial's events while it is in flight (a retried
        trial's repeats for members that already finished are dropped; the others' rungs come
        again, and the loop's curve keeps the retry's), and Tune's word turned into the trials'
        outcomes."""
        if isinstance(event, (Started, AtRung, Finished)):
            if event.number not in self._in_flight:
                return []  # an earlier try's trial, recorded already
            if isinstance(event, AtRung) and key is not None:
                self._rung_key[event.number] = key
            if isinstance(event, Finished):
                del self._in_flight[event.number]
            return [event]
        if isinstance(event, Vacant):
            if key is None or event.population not in self._busy:
                return []
            self._seat_key[event.population] = key
            return [event]
        if isinstance(event, _TrialRetried):
            # the retry trains its own members again, not the trials admitted into it, which fail
            # (with why) instead of staying live with no worker
            out: list[Event] = [Note(f"  trial {event.population}: its worker died; retrying it "
                                     f"({MAX_FAILURES} tries)")]  # fmt: skip
            reason = "its population's Ray worker died after it was admitted into it"
            for number in self._refills.pop(event.population, []):
                if self._in_flight.pop(number, None) is not None:
                    out.append(Finished(number, TrialOutcome(M.FAILED, {"reason": reason, "state": M.FAILED})))
            return out
        if isinstance(event, _TrialEnded):
            self._busy.discard(event.population)
            self._refills.pop(event.population, None)
            out = []
            for number in [n for n, p in self._in_flight.items() if p == event.population]:
                del self._in_flight[number]
                reason = event.error or "its Ray trial ended before it did"
                attrs: dict[str, Any] = {"reason": reason, "state": M.FAILED}
                if event.error:
                    attrs["error"] = "WorkerError"
                out.append(Finished(number, TrialOutcome(M.FAILED, attrs)))
            return out
        return [event]  # Note

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
                search_alg=_Searcher(self._channel_name),
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
                callbacks=[_Callback(self._channel_name)],
                failure_config=tune.FailureConfig(max_failures=MAX_FAILURES),
                stop=_Stopper(self._channel_name),
            ),
        )


def _unfinish(experiment: Path) -> None:
    """Clear the finished flag Tune saved with its search generator. Every session ends by the
    searcher saying it is finished (Tune waits for a trial until then), Tune saves that with the
    experiment, and ``Tuner.restore`` takes no new searcher: a restored experiment would never ask
    for a trial again, so a finished search resumed with more ``--trials`` stopped at once. Tune's
    own state file (a pickle); one that does not read as expected is left alone."""
    for path in experiment.glob("search_gen_state-*.json"):
        try:
            state = pickle.loads(path.read_bytes())
        except Exception:
            continue
        if isinstance(state, dict) and state.get("finished"):
            state["finished"] = False
            path.write_bytes(cloudpickle.dumps(state))  # (as Tune writes it: it holds functions)


def channel_name(experiment: Path) -> str:
    """The channel actor's name: one per run dir (kept in the experiment folder, so a resumed search,
    even of a moved run dir, names it as Tune's restored objects do)."""
    return "attn_search-" + hashlib.sha1(str(experiment).encode()).hexdigest()[:16]


@ray.remote(num_cpus=0)
class _Channel:
    """Between the driver and its Tune trials: events up (a trial puts a batch, keyed when it waits
    for an answer), commands down (the driver answers a key), the jobs Tune's searcher hands out,
    and the flag that stops everything. Asynchronous: a waiting trial holds no thread."""

    def __init__(self) -> None:
        self._jobs: deque[dict[str, Any]] = deque()
        self._finishing = False
        self._stop_all = False
        self._batches: list[tuple[str | None, list[Any]]] = []
        self._new = asyncio.Event()
        self._answers: dict[str, tuple[float, list[tuple[Any, ...]]]] = {}  # key -> (when, commands)
        self._answered: dict[str, asyncio.Event] = {}

    async def push_job(self, config: dict[str, Any]) -> None:
        self._jobs.append(config)

    async def next_job(self) -> dict[str, Any] | str | None:
        if self._finishing:
            return str(Searcher.FINISHED)
        return self._jobs.popleft() if self._jobs else None  # None: Tune asks again later

    async def finish(self, stop_all: bool) -> None:
        self._finishing, self._stop_all = True, stop_all
        self._jobs.clear()

    async def stopping(self) -> bool:
        return self._stop_all

    async def put(self, key: str | None, events: list[Any]) -> None:
        self._batches.append((key, events))
        self._new.set()

    async def take(self, wait_s: float) -> list[tuple[str | None, list[Any]]]:
        """The batches put since the last call; waits up to ``wait_s`` for one (no busy polling)."""
        if not self._batches and wait_s > 0:
            self._new.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._new.wait(), wait_s)
        got, self._batches = self._batches, []
        return got

    async def command(self, key: str, commands: list[tuple[Any, ...]]) -> None:
        now = time.monotonic()
        # an answer nobody took (its trial died, or stopped waiting) is dropped after a while
        for old in [k for k, (when, _) in self._answers.items() if now - when > 2 * ANSWER_TIMEOUT_S]:
            del self._answers[old]
        self._answers[key] = (now, commands)
        if key in self._answered:
            self._answered[key].set()

    async def commands(self, key: str, wait_s: float) -> list[tuple[Any, ...]] | None:
        """The driver's answer to batch ``key``; ``None`` if none came in ``wait_s``."""
        if key not in self._answers:
            answered = self._answered.setdefault(key, asyncio.Event())
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(answered.wait(), wait_s)
            self._answered.pop(key, None)
        found = self._answers.pop(key, None)
        return None if found is None else found[1]


def _members(config: dict[str, Any]) -> list[tuple[int, dict[str, Any]]]:
    """The jobs of a Tune trial's config: ``(number, values)``."""
    return [(int(number), values) for number, values in json.loads(config[MEMBERS])]


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


def _trainable(config: dict[str, Any], runner: TrialRunner, channel: Any) -> None:
    """One Tune trial: one slot (:class:`SlotRun`), its events put into ``channel``, the loop's
    commands taken from it where the events asked for them (a rung, a vacant seat)."""
    place = _place(runner)
    trial_id = tune.get_context().get_trial_id()
    this_try = uuid.uuid4().hex[:8]  # a retried trial keeps its id: its answers must not be the dead try's
    slot = SlotRun(runner, [Job(number, values) for number, values in _members(config)])
    batches = itertools.count()
    step = 0
    while not slot.done:
        events = slot.advance()
        if not events:
            continue
        for event in events:
            if isinstance(event, Finished):
                event.outcome.attrs.update(place, ray_trial_id=trial_id)
        asks = any(isinstance(e, (AtRung, Vacant)) for e in events)
        key = f"{trial_id}:{this_try}:{next(batches)}" if asks else None
        ray.get(channel.put.remote(key, events))  # (before the trial can end: Tune's word comes after)
        rungs = [e for e in events if isinstance(e, AtRung)]
        if rungs:  # progress for Tune's loggers
            step = max(step, *(e.step for e in rungs))
            tune.report({STEP: step, "best_accuracy": max(e.accuracy for e in rungs), "members": len(rungs),
                         FINAL: False, **place})  # fmt: skip
        if key is None:
            continue
        for command in ray.get(channel.commands.remote(key, ANSWER_TIMEOUT_S)) or []:
            if command[0] == "stop":
                slot.stop(int(command[1]))
            else:
                slot.admit(int(command[1]), Job(int(command[2]), dict(command[3])))
    tune.report({FINAL: True, STEP: step, **place})


class _ByName:
    """A Tune object that reaches the search's channel by its name (Tune pickles it into the
    experiment; the actor handle is looked up again where it is unpickled)."""

    def __init__(self, name: str) -> None:
        self.channel_name = name
        self._handle: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_handle": None}

    def channel(self) -> Any:
        if self._handle is None:
            self._handle = ray.get_actor(self.channel_name)
        return self._handle

    def tell(self, event: Any) -> None:
        self.channel().put.remote(None, [event])


class _Searcher(_ByName, Searcher):  # type: ignore[misc]
    """Hands Tune the jobs the loop submitted; ``None`` (ask again later) while there is none."""

    def __init__(self, name: str) -> None:
        _ByName.__init__(self, name)
        Searcher.__init__(self)

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:  # type: ignore[override]
        return ray.get(self.channel().next_job.remote())  # type: ignore[no-any-return]

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        pass  # the loop tells the strategy (the trial's own events)

    def save(self, checkpoint_path: str) -> None:
        Path(checkpoint_path).write_text("{}")  # no state: the run's study and strategy hold it

    def restore(self, checkpoint_path: str) -> None:
        pass


class _Stopper(_ByName, tune.Stopper):  # type: ignore[misc]
    """Stops every running trial when the loop gives up on them (interrupt, failure policy)."""

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        return False

    def stop_all(self) -> bool:
        try:
            return bool(ray.get(self.channel().stopping.remote(), timeout=10))
        except Exception:  # Ray is shutting down
            return False


class _Callback(_ByName, tune.Callback):  # type: ignore[misc]
    """Tune's word on its trials, into the event stream: ended, failed for good, retried."""

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self.tell(_TrialEnded(int(trial.config[NUMBER])))

    def on_trial_recover(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self.tell(_TrialRetried(int(trial.config[NUMBER])))

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        error = trial.get_error() or "the trial's worker failed"
        line = next((ln for ln in reversed(str(error).strip().splitlines()) if ln.strip()), str(error))
        self.tell(
            _TrialEnded(int(trial.config[NUMBER]), f"worker failed {MAX_FAILURES + 1} times: {line.strip()[:300]}")
        )


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
