"""Training: build the model configurations describe, train it on a task for a budget, measure it.

One loop trains ``K`` members of one model (:mod:`attn_search.engine.model`'s member axis); a
single trial is a population of one, and trains the plain model the export writes
(:func:`model_for`: :mod:`attn_search.engine.single`). A :class:`Population` is steppable:
:meth:`Population.advance` trains until there is something to say and returns it as events
(compute known, a rung reached, a member ended, a slot freed), and the caller answers with
commands (:meth:`Population.stop` a member at its rung, :meth:`Population.admit` a configuration
into a freed slot). Nothing here calls back into a caller. :class:`Training` does the same for
configurations of several shapes (one population per shape, in turn). :func:`evaluate` and
:func:`evaluate_many` drive them for a library user, with callbacks: ``reporter(step, accuracy)``
at rungs may stop a trial early (return ``True`` or raise :class:`StopTrial`). A non-finite loss
ends the trial with ``state="failed"`` and a reason.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

from attn_search.engine import metrics as M
from attn_search.engine.config import AttentionConfig
from attn_search.engine.cost import (
    measure_latency,
    model_attention_flops,
    model_attention_tile_flops,
    model_flops,
    peak_memory_mb,
    training_state_mb,
)
from attn_search.engine.model import AttentionModel, build_model, count_params, member_losses, shape_key
from attn_search.engine.single import SingleModel
from attn_search.engine.tasks import IGNORE, Task, make_task

Reporter = Callable[[int, float], "bool | None"]
"""``reporter(step, accuracy)``; returning ``True`` (or raising :class:`StopTrial`) stops the trial."""


class StopTrial(Exception):
    """Raised by a reporter to stop a trial early; the trial ends with ``state="pruned"``."""


@dataclasses.dataclass(frozen=True)
class Budget:
    """How long one trial trains and how it is measured."""

    steps: int = 300
    """Optimizer steps."""
    rungs: int = 4
    """Evaluations on the held-out set, evenly spaced; the last one is at ``steps``."""
    n_eval: int = 256
    """Held-out examples per evaluation."""
    max_train_examples: int = 16384
    """Distinct training examples generated (``steps * batch_size`` capped here; cycled after)."""
    latency_batch: int = 16
    """Sequences per timed forward pass for ``latency_ms``."""
    time_limit_s: float | None = None
    """Stop training (as if the budget ended) once this much wall time has passed."""
    target_len: int | None = None
    """Report compute at this sequence length instead of the task's (the length a user deploys):
    ``flops`` at it, ``latency_ms`` and ``peak_mem_mb`` measured on a forward pass at it (see
    :func:`measure_at_length`). Accuracy is still trained and measured at the task's length."""

    def __post_init__(self) -> None:
        if self.steps < 1 or self.rungs < 1 or self.n_eval < 1 or self.latency_batch < 1:
            raise ValueError(f"budget {self} is invalid: steps, rungs, n_eval and latency_batch must be >= 1")
        if self.target_len is not None and self.target_len < 1:
            raise ValueError(f"budget {self} is invalid: target_len must be >= 1")

    def rung_steps(self) -> list[int]:
        """Steps after which accuracy is evaluated and reported."""
        n = min(self.rungs, self.steps)
        return sorted({max(1, round(self.steps * (i + 1) / n)) for i in range(n)})


PRESETS: dict[str, Budget] = {
    "smoke": Budget(steps=40, rungs=2, n_eval=128, latency_batch=4),
    "default": Budget(),
    "full": Budget(steps=1500, rungs=6, n_eval=1024),
}
"""Named budgets used by ``--preset``."""


@dataclasses.dataclass
class TrialResult:
    """What one trial produced.

    ``metrics`` holds at least ``accuracy``, ``flops``, ``params``, ``latency_ms``,
    ``peak_mem_mb`` and ``train_seconds`` (see :mod:`attn_search.engine.metrics`); ``curve`` holds the
    ``(step, accuracy)`` points reported during training.
    """

    config: AttentionConfig
    metrics: dict[str, float]
    curve: list[tuple[int, float]]
    state: str = M.COMPLETE
    reason: str | None = None
    device: str = "cpu"
    task: str = "mqar"

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "metrics": dict(self.metrics),
            "curve": [list(p) for p in self.curve],
            "state": self.state,
            "reason": self.reason,
            "device": self.device,
            "task": self.task,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrialResult:
        return cls(
            config=AttentionConfig.from_dict(dict(data["config"])),
            metrics={k: float(v) for k, v in data["metrics"].items()},
            curve=[(int(s), float(a)) for s, a in data.get("curve", [])],
            state=str(data.get("state", M.COMPLETE)),
            reason=data.get("reason"),
            device=str(data.get("device", "cpu")),
            task=str(data.get("task", "mqar")),
        )


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` is CUDA when available, else CPU; asking for CUDA without one is a ``ValueError``."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} was asked for but no CUDA GPU is visible: use --device cpu or auto")
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"device={device!r} is unknown: use auto, cpu or cuda")
    return torch.device(device)


def _autocast(device: torch.device) -> AbstractContextManager[Any]:
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def lr_factor(step: int, *, warmup: int, total: int) -> float:
    """Linear warm-up to 1, then cosine decay to 0.1 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


SYNC_EVERY = 50
"""Steps between reads of the members' losses from the device besides rungs (a diverged member is
failed at the next read; until then it trains on, alone, on non-finite weights)."""

CUDA_GRAPHS = os.environ.get("ATTN_SEARCH_CUDA_GRAPHS", "0") == "1"
"""Capture a population's training step on CUDA as one CUDA graph and replay it
(``ATTN_SEARCH_CUDA_GRAPHS=1``; see :class:`_GraphedStep`). Off by default: whether it pays at
these sizes has not been measured on a GPU yet (``benchmarks/gpu_check.py`` times both)."""


Stop = bool | str | None
"""A reporter's answer: falsy goes on; ``True`` stops; a string stops with that reason."""
RungReporter = Callable[[Sequence[tuple[int, int, float]]], Sequence[Stop]]
"""``report_rungs([(member, step, accuracy), ...])``: the rungs members reached at one point of
training (each at its own step: refilled members started later), in one call; one answer per rung,
in order (:func:`evaluate_many`'s way of taking the stop commands)."""
Refill = Callable[[], "AttentionConfig | None"]
"""``refill()``: the next configuration for a freed slot, or ``None`` when there is none. Its
member index is the next after those given (in the order ``refill`` returned them)."""


@dataclasses.dataclass(frozen=True)
class Computed:
    """Event: ``member``'s compute figures (``flops``, ``params``, ``latency_ms``, ``peak_mem_mb``)
    are known; always before its first :class:`Rung`."""

    member: int
    figures: dict[str, float]


@dataclasses.dataclass(frozen=True)
class Rung:
    """Event: ``member`` reached a rung, held-out ``accuracy`` after ``step`` steps. It waits there:
    :meth:`Population.stop` before the next :meth:`Population.advance` ends it (``pruned``)."""

    member: int
    step: int
    accuracy: float


@dataclasses.dataclass(frozen=True)
class Ended:
    """Event: ``member`` ended (complete, pruned or failed) with ``result``."""

    member: int
    result: TrialResult


@dataclasses.dataclass(frozen=True)
class Freed:
    """Event: population slot ``slot`` is free. :meth:`Population.admit` before the next
    :meth:`Population.advance` fills it; left empty, it is dropped (on the CPU at once; where a new
    size compiles again, once half the slots are empty)."""

    slot: int


PopulationEvent = Computed | Rung | Ended | Freed


def evaluate(
    config: AttentionConfig | Mapping[str, Any],
    task: str | Task = "mqar",
    *,
    budget: Budget | str | int | None = None,
    seed: int | None = None,
    device: str | torch.device = "auto",
    reporter: Reporter | None = None,
    task_kwargs: Mapping[str, Any] | None = None,
    kernel: str = "auto",
    on_compute: Callable[[dict[str, float]], None] | None = None,
) -> TrialResult:
    """Train ``config`` on ``task`` for ``budget`` and measure it: :func:`evaluate_many` of one.

    Args:
        config: an :class:`AttentionConfig` or a mapping of its fields.
        task: a task name, a ``module:callable`` path or a :class:`~attn_search.engine.tasks.Task`.
        budget: a :class:`Budget`, a preset name (``smoke``, ``default``, ``full``) or a step count.
        seed: overrides ``config.seed`` (initialisation, data order, dropout).
        device: ``auto``, ``cpu`` or ``cuda``. On CUDA the model trains under bf16 autocast.
        reporter: called as ``reporter(step, accuracy)`` at each rung; ``True`` or
            :class:`StopTrial` stops the trial (``state="pruned"``).
        task_kwargs: passed to the task's constructor (``seq_len``, ``seed``, ...).
        kernel: attention kernel for every layer (``auto`` picks per device and pattern).
        on_compute: called once, before the first rung, with the compute metrics (``flops``,
            ``params``, ``latency_ms``, ``peak_mem_mb``), so that early stopping can weigh them.

    Returns:
        A :class:`TrialResult`. Same seed on CPU gives the same accuracy and curve. The caller's
        random state (torch's global generators, which an RL agent samples its actions from) is
        left as it was: the trial seeds and draws inside a fork of it.
    """
    cfg = config if isinstance(config, AttentionConfig) else AttentionConfig.from_dict(dict(config))
    if seed is not None:
        cfg = cfg.replace(seed=seed)
    return evaluate_many(
        [cfg], task, budget=budget, device=device, task_kwargs=task_kwargs, kernel=kernel,
        reporter=(lambda member, step, accuracy: reporter(step, accuracy)) if reporter else None,
        on_compute=(lambda member, figures: on_compute(figures)) if on_compute else None,
    )[0]  # fmt: skip


def _asking(reporter: Callable[[int, int, float], Stop]) -> RungReporter:
    def report_rungs(rungs: Sequence[tuple[int, int, float]]) -> list[Stop]:
        stops: list[Stop] = []
        for member, step, accuracy in rungs:
            try:
                stops.append(bool(reporter(member, step, accuracy)))
            except StopTrial as exc:
                stops.append(str(exc) or True)
        return stops

    return report_rungs


def train_model(
    config: AttentionConfig,
    task: str | Task = "mqar",
    *,
    budget: Budget | str | int | None = None,
    device: str | torch.device = "auto",
    task_kwargs: Mapping[str, Any] | None = None,
) -> tuple[SingleModel, TrialResult]:
    """Train ``config`` exactly as :func:`evaluate` does and also return the trained model, the
    plain model of a trial of one (to look inside it: the report's picture of what each head attends)."""
    dev, bud = resolve_device(device), _resolve_budget(budget)
    the_task = make_task(task, **dict(task_kwargs or {}))
    pop = Population([(0, config)], the_task, bud, dev, "auto")
    results: list[TrialResult] = []
    while not pop.done:
        results += [event.result for event in pop.advance() if isinstance(event, Ended)]
    assert isinstance(pop.model, SingleModel)
    return pop.model.eval(), results[0]


def evaluate_many(
    configs: Sequence[AttentionConfig | Mapping[str, Any]],
    task: str | Task = "mqar",
    *,
    budget: Budget | str | int | None = None,
    device: str | torch.device = "auto",
    reporter: Callable[[int, int, float], Stop] | None = None,
    report_rungs: RungReporter | None = None,
    task_kwargs: Mapping[str, Any] | None = None,
    on_compute: Callable[[int, dict[str, float]], None] | None = None,
    refill: Refill | None = None,
    on_result: Callable[[int, TrialResult], None] | None = None,
    kernel: str = "auto",
    heads: tuple[int, int] | None = None,
    member_layout: str = "auto",
) -> list[TrialResult]:
    """Train several configurations at once as populations (one model with a member axis,
    :mod:`attn_search.engine.model`; a population of one trains the plain model, :func:`model_for`);
    returns one :class:`TrialResult` per member in member order, each what training that
    configuration alone gives (the same initial weights, data order, schedule and optimiser
    arithmetic).

    Configurations that share :func:`~attn_search.engine.model.shape_key` (whatever their head
    counts and patterns) train as one population of fixed size. A member that finishes, is stopped
    or diverges frees its slot, and ``refill()`` (if given) puts the next configuration in it from
    step 0 while the others go on: members are at different steps, each with its own step counter,
    schedule and rungs, and the population keeps its shape (no rebuild, no recompile). A refill of
    another shape waits for a population of its own. The caller's random state is left as it was.

    Args:
        configs: configurations (or mappings of their fields); member ``i`` is ``configs[i]``.
        task, budget, device, task_kwargs, kernel: as for :func:`evaluate`.
        reporter: ``reporter(member, step, accuracy)`` at each rung; ``True`` (or
            :class:`StopTrial`) stops that member.
        report_rungs: instead of ``reporter``, all rungs reached together in one call (:data:`RungReporter`).
        on_compute: ``on_compute(member, figures)`` once per member, before its first rung.
        refill: the next configuration for a freed slot (:data:`Refill`).
        on_result: ``on_result(member, result)`` as soon as a member ends (before its slot is refilled).
        heads: the (min, max) head counts the refills may bring (a search space's range): the
            head groups of CUDA's populations start that wide, so no refill changes a shape or
            compiles FlexAttention again.
        member_layout: how the members attend (:mod:`attn_search.engine.member_layout`): ``auto``
            (each on its own path on the CPU, grouped on CUDA) or ``grouped`` (CUDA's, anywhere).

    Time and memory cannot be split exactly between members: ``latency_ms``, ``train_seconds``,
    ``eval_seconds`` and ``wall_seconds`` are the population's divided by its size, and
    ``peak_mem_mb`` is a member's training state plus its share of the measured step peak. Dropout
    masks are drawn for the population, so members with dropout agree with their one-by-one runs
    only statistically.
    """
    if reporter is not None and report_rungs is not None:
        raise ValueError("give reporter or report_rungs, not both")
    if reporter is not None:
        report_rungs = _asking(reporter)
    dev = resolve_device(device)
    bud = _resolve_budget(budget)
    the_task = make_task(task, **dict(task_kwargs or {}))
    as_config = lambda c: c if isinstance(c, AttentionConfig) else AttentionConfig.from_dict(dict(c))  # noqa: E731
    training = Training([(i, as_config(c)) for i, c in enumerate(configs)], the_task, bud, dev, kernel=kernel,
                        heads=heads, member_layout=member_layout)  # fmt: skip
    results: dict[int, TrialResult] = {}
    count = len(configs)
    while not training.done:
        rungs: list[Rung] = []
        drawing = refill is not None  # (a refill of another shape, or none now: no more this round)
        for event in training.advance():
            if isinstance(event, Computed):
                if on_compute is not None:
                    on_compute(event.member, dict(event.figures))
            elif isinstance(event, Rung):
                rungs.append(event)
            elif isinstance(event, Ended):
                results[event.member] = event.result
                if on_result is not None:
                    on_result(event.member, event.result)
            elif drawing:  # Freed
                config = refill() if refill is not None else None
                if config is None:
                    drawing = False
                    continue
                count += 1
                drawing = training.admit(event.slot, count - 1, as_config(config))
        if rungs and report_rungs is not None:
            stops = report_rungs([(r.member, r.step, r.accuracy) for r in rungs])
            for rung, stop in zip(rungs, stops, strict=True):
                if stop:
                    training.stop(rung.member, stop if isinstance(stop, str) else None)
    return [results[i] for i in sorted(results)]


def model_for(configs: Sequence[AttentionConfig], task: Task, *, kernel: str = "auto",
              heads: tuple[int, int] | None = None, member_layout: str = "auto") -> AttentionModel | SingleModel:  # fmt: skip
    """The model a population trains: for one configuration on the ``auto`` kernel and layout, the
    plain model the export writes (:class:`~attn_search.engine.single.SingleModel`), so a lone
    trial is trained and timed on what a user deploys; otherwise the member-axis model
    (:func:`~attn_search.engine.model.build_model`), whose members train as their lone trials do."""
    if len(configs) == 1 and kernel == "auto" and member_layout == "auto":
        return SingleModel(configs[0], task)
    return build_model(configs, task, kernel=kernel, heads=heads, member_layout=member_layout)


class Training:
    """Configurations of any shapes trained as populations, one shape at a time (members that share
    :func:`~attn_search.engine.model.shape_key` train as one :class:`Population`), behind the
    population's protocol: :meth:`advance` returns events, :meth:`stop` and :meth:`admit` are the
    commands. A freed slot is announced only while no other shape waits (the population drains
    first); a configuration admitted with another shape waits for a population of its own."""

    def __init__(self, members: Sequence[tuple[int, AttentionConfig]], task: Task, bud: Budget, dev: torch.device, *,
                 kernel: str = "auto", heads: tuple[int, int] | None = None, member_layout: str = "auto") -> None:  # fmt: skip
        self.task, self.bud, self.dev, self.kernel = task, bud, dev, kernel
        self.heads, self.member_layout = heads, member_layout
        self.waiting = list(members)
        # one time limit for the whole call, whichever population trains when
        self.deadline = None if bud.time_limit_s is None else time.perf_counter() + bud.time_limit_s
        self.population: Population | None = None

    @property
    def done(self) -> bool:
        return self.population is None and not self.waiting

    def advance(self) -> list[PopulationEvent]:
        """The current population's next events (starting the next shape's when it is done)."""
        if self.population is None:
            if not self.waiting:
                return []
            key = shape_key(self.waiting[0][1])
            members = [w for w in self.waiting if shape_key(w[1]) == key]
            self.waiting = [w for w in self.waiting if shape_key(w[1]) != key]
            self.population = Population(members, self.task, self.bud, self.dev, self.kernel, self.deadline,
                                         self.heads, self.member_layout)  # fmt: skip
        events = self.population.advance()
        if self.waiting:
            events = [e for e in events if not isinstance(e, Freed)]
        if self.population.done:
            self.population = None
        return events

    def stop(self, member: int, reason: str | None = None) -> None:
        """End ``member`` at the rung it just reported."""
        if self.population is not None:
            self.population.stop(member, reason)

    def admit(self, slot: int, member: int, config: AttentionConfig) -> bool:
        """Put ``config`` (as ``member``) into freed ``slot``; ``False`` when it waits for a
        population of its own instead (its shape differs, or another shape already waits: the
        population drains first), and the slot stays free."""
        if self.population is None or self.waiting or shape_key(config) != self.population.key:
            self.waiting.append((member, config))
            return False
        self.population.admit(slot, member, config)
        return True


class Population:
    """One population's training: the model, the optimiser, per-member tables on the device (batch
    rows and learning rate for every step, rates), and on the host what each slot holds.

    Steppable (see the module docstring): :meth:`advance`, then the commands :meth:`stop` and
    :meth:`admit`, until :attr:`done`. It owns its random state, so a caller that draws random
    numbers between two advances (an RL agent) changes nothing in it, and it changes nothing in
    the caller's."""

    def __init__(self, members: list[tuple[int, AttentionConfig]], task: Task, bud: Budget, dev: torch.device,
                 kernel: str, deadline: float | None = None, heads: tuple[int, int] | None = None,
                 member_layout: str = "auto") -> None:  # fmt: skip
        self.dev = dev
        self._rng_state: tuple[torch.Tensor, torch.Tensor | None] | None = None
        with self._own_rng():
            self._setup(members, task, bud, dev, kernel, deadline, heads, member_layout)

    def _setup(self, members: list[tuple[int, AttentionConfig]], task: Task, bud: Budget, dev: torch.device,
               kernel: str, deadline: float | None, heads: tuple[int, int] | None, member_layout: str) -> None:  # fmt: skip
        self.start = time.perf_counter()
        self.deadline = deadline
        bud = at_own_length(bud, task)
        self.task, self.bud, self.dev, self.kernel, self.member_layout = task, bud, dev, kernel, member_layout
        cfgs = [c for _, c in members]
        self.key = shape_key(cfgs[0])
        self.K = K = len(cfgs)
        self.batch = cfgs[0].batch_size
        self.n_train = min(bud.steps * self.batch, bud.max_train_examples)
        x_train, y_train = task.data("train", self.n_train)
        x_eval, y_eval = task.data("eval", bud.n_eval)
        self.x_train, self.y_train, self.x_eval, self.y_eval = (t.to(dev) for t in (x_train, y_train, x_eval, y_eval))
        torch.manual_seed(cfgs[0].seed)  # dropout draws (weights come from each member's own seed)
        if heads is not None:  # the range must hold the first members too
            heads = (min(heads[0], *(c.n_heads for c in cfgs)), max(heads[1], *(c.n_heads for c in cfgs)))
        self.model = model_for(cfgs, task, kernel=kernel, heads=heads, member_layout=member_layout).to(dev)
        self.timer = _StepTimer(dev)
        self.opt = MemberAdamW(self.model)
        self.slots: list[int | None] = [i for i, _ in members]  # member id in each slot; None: free
        self.configs = cfgs
        # every step's batch rows and learning rate for every slot, on the device before the first
        # step: a step indexes them with the slots' step counters instead of running Python per member
        self.rows = torch.stack([_batch_rows(c.seed, self.n_train, self.batch, bud.steps) for c in cfgs]).to(
            dev
        )  # (K, S, B)
        self.lr = torch.stack([self._lrs(c) for c in cfgs]).to(dev)  # (K, S)
        self.smoothing = torch.tensor([c.label_smoothing for c in cfgs], device=dev)
        self.step_of = torch.zeros(K, dtype=torch.long, device=dev)  # each slot's next step (0-based)
        self.live = torch.ones(K, device=dev)  # 0 for a free slot: its learning rate is 0
        self.steps = [0] * K  # the same counters, on the host
        self.slot_range = torch.arange(K, device=dev)
        self.last_loss = torch.full((K,), math.nan, device=dev)
        self.bad_step = torch.zeros(K, device=dev)  # first step whose loss was not finite; 0: none
        self.bad_loss = torch.zeros(K, device=dev)
        self.curves: dict[int, list[tuple[int, float]]] = {i: [] for i, _ in members}
        self.compute: dict[int, dict[str, float]] = {}
        # a member's share of the population's time: every interval divided by the members then
        # training, summed (so a population that shrinks charges its survivors correctly)
        self.train_s = self.eval_s = self.wall_s = 0.0
        self.clock = self.start
        self.admitted: dict[int, tuple[float, float, float]] = {i: (0.0, 0.0, 0.0) for i, _ in members}
        self.measure_s = 0.0
        self.pop_figures: dict[str, float] = {}
        self.eval_batch: int | None = None  # sequences per member per evaluation pass (None: by device)
        # the training step: captured as a CUDA graph where asked for (CUDA_GRAPHS), else eager
        self.step: Callable[[], torch.Tensor] = _GraphedStep(self) if _graphed(dev, kernel, K) else self.train_step
        # the protocol's state between two advances
        self._measured = False
        self._steps_run = 0  # the population's steps so far
        self._last_loss: dict[int, float] = {}
        self._pending: list[int] | None = None  # slots at a rung, waiting for stop commands
        self._stops: dict[int, str | None] = {}  # member -> why it stops at its rung (None: the default)
        self._freed: list[int] = []  # slots whose members ended at the pending check (diverged)
        self._out_of_time = False
        self._announced: set[int] = set()  # freed slots announced and not (yet) admitted into
        self._queued: list[PopulationEvent] = []  # events of commands, said at the next advance

    @contextlib.contextmanager
    def _own_rng(self) -> Iterator[None]:
        """Run with the population's random state (the caller's is put back after)."""
        cuda = self.dev.type == "cuda"
        with torch.random.fork_rng(devices=[self.dev] if cuda else []):
            if self._rng_state is not None:
                torch.set_rng_state(self._rng_state[0])
                if cuda and self._rng_state[1] is not None:
                    torch.cuda.set_rng_state(self._rng_state[1], self.dev)
            try:
                yield
            finally:
                self._rng_state = (torch.get_rng_state(), torch.cuda.get_rng_state(self.dev) if cuda else None)

    def _lrs(self, config: AttentionConfig) -> torch.Tensor:
        S = self.bud.steps
        return torch.tensor([config.lr * lr_factor(s, warmup=config.warmup_steps, total=S) for s in range(S)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with _autocast(self.dev):
            return self.model(x)

    # -- compute figures ---------------------------------------------------------------------------
    def measure(self) -> None:
        """Latency once for the population (it does not depend on the weights), before training."""
        t0 = time.perf_counter()
        bud, K = self.bud, self.K
        self.model.eval()
        if bud.target_len is None:
            lat_x = self.x_eval[: bud.latency_batch].unsqueeze(0).expand(K, -1, -1)
            with torch.no_grad():
                latency, spread = measure_latency(lambda: self.forward(lat_x), device=self.dev)
            self.pop_figures = {M.LATENCY_MS: latency / K, M.LATENCY_SPREAD: spread}
        self.model.train()
        for k, member in enumerate(self.slots):
            assert member is not None
            self.compute[member] = self._figures(self.configs[k])
        self.measure_s = (time.perf_counter() - t0) / self.K  # each initial member's share

    def _figures(self, config: AttentionConfig) -> dict[str, float]:
        bud, L = self.bud, self.task.seq_len
        figures = {M.PARAMS: float(count_params(self.model))}
        if bud.target_len is None:
            figures.update({M.FLOPS: float(model_flops(config, seq_len=L, n_classes=self.task.n_classes)),
                            M.ATTN_FLOPS: float(model_attention_flops(config, seq_len=L)),
                            M.ATTN_TILE_FLOPS: float(model_attention_tile_flops(config, seq_len=L)), **self.pop_figures})  # fmt: skip
        else:  # each member alone at the user's length (its own pattern's cost); accuracy where it trains
            figures.update(measure_at_length(config, self.task, bud.target_len, device=self.dev,
                                             batch=target_batch(bud, L), kernel=self.kernel,
                                             member_layout=self.member_layout))  # fmt: skip
        return figures

    # -- training ----------------------------------------------------------------------------------
    def train_step(self) -> torch.Tensor:
        rows = self.rows[self.slot_range, self.step_of]  # (K, B)
        xb, yb = self.x_train[rows], self.y_train[rows]  # (K, B, L)
        lr = self.lr[self.slot_range, self.step_of] * self.live  # (K,)
        smoothing = self.smoothing if self.K > 1 else self.configs[0].label_smoothing
        losses = member_losses(self.forward(xb), yb, smoothing)  # (K,)
        self.opt.zero_grad()
        losses.sum().backward()  # members share no parameter: each gets its own loss's gradient
        self.opt.step(lr)
        # every piece of state is updated in place (no attribute is rebound), so a captured CUDA graph
        # of this step stays valid and a refill's copies are seen by it
        losses = losses.detach()
        first_bad = ~torch.isfinite(losses) & (self.bad_step == 0)
        self.bad_step.copy_(torch.where(first_bad, (self.step_of + 1).float(), self.bad_step))  # the step just run
        self.bad_loss.copy_(torch.where(first_bad, losses, self.bad_loss))
        self.last_loss.copy_(losses)
        self.step_of.add_(1).clamp_(max=self.bud.steps - 1)  # a free slot stays on its last step
        return losses

    @torch.no_grad()
    def accuracies(self) -> list[float]:
        """Every slot's fraction of scored eval positions predicted right (one read). Passes of 256
        sequences per member on CUDA (fewest launches); on the CPU about 256 in all, so a population's
        evaluation needs no more memory than a trial's."""
        self.model.eval()
        K, x, y = self.K, self.x_eval, self.y_eval
        batch = self.eval_batch or (256 if self.dev.type == "cuda" else max(16, 256 // K))
        right = torch.zeros(K, device=self.dev)
        total = torch.zeros(K, device=self.dev)
        for i in range(0, len(x), batch):
            xb, yb = x[i : i + batch], y[i : i + batch]
            pred = self.forward(xb.unsqueeze(0).expand(K, -1, -1)).argmax(-1)  # (K, b, L)
            scored = (yb != IGNORE).unsqueeze(0)  # (1, b, L)
            right += ((pred == yb.unsqueeze(0)) & scored).flatten(1).sum(1)
            total += scored.flatten(1).sum(1)
        self.model.train()
        return (right / total.clamp(min=1)).tolist()

    # -- the protocol: events out, commands in -----------------------------------------------------
    @property
    def done(self) -> bool:
        """No member left to train and no freed slot waiting for an answer."""
        return self._pending is None and not self._announced and all(m is None for m in self.slots)

    def stop(self, member: int, reason: str | None = None) -> None:
        """Command: end ``member`` (``pruned``, with ``reason``) at the rung it just reported (a
        member not waiting at a rung is not stopped)."""
        if self._pending is not None and member in (self.slots[k] for k in self._pending):
            self._stops[member] = reason

    def admit(self, slot: int, member: int, config: AttentionConfig) -> None:
        """Command: start ``config`` as ``member`` in freed ``slot`` from step 0, with fresh weights
        and optimiser state (its schedule and rungs its own)."""
        if self.slots[slot] is not None or self._pending is not None:
            raise ValueError(f"slot {slot} is not free to admit into")
        with self._own_rng():
            self._admit(slot, member, config)
        self._announced.discard(slot)

    def advance(self) -> list[PopulationEvent]:
        """Train until there is something to say (a rung reached, a member ended, a slot freed, or
        nothing left), and return it. The rungs of one check come together; the stops given for
        them take effect at the start of the next call."""
        with self._own_rng():
            if self._pending is not None:
                events = self._resolve()
                if events:
                    return events
            return self._train()

    def _train(self) -> list[PopulationEvent]:
        events, self._queued = self._queued, []
        if self._announced:  # freed slots nobody filled: they stop costing compute
            self._announced.clear()
            live = [k for k, m in enumerate(self.slots) if m is not None]
            compiled = self.dev.type == "cuda" or self.kernel == "flex"  # (a new size compiles again)
            if live and len(live) < self.K and (not compiled or len(live) <= self.K // 2):
                self._compact(live)
        bud = self.bud
        rungs = set(bud.rung_steps())
        # step 2 (after step 1 allocated the optimiser state), never after the first rung: the
        # compute figures must be known when the first accuracy is reported
        memory_step = min(2, min(rungs))
        if not self._measured:
            self.measure()
            self._measured = True
            self._state_mb = training_state_mb(self.model) / self.K
        while any(m is not None for m in self.slots):
            self._steps_run += 1
            started = self.timer.start()
            if self._steps_run == memory_step:
                _, peak = peak_memory_mb(self.train_step, device=self.dev)
                self.pop_figures[M.PEAK_MEM_MB] = self._state_mb + (0.0 if math.isnan(peak) else peak / self.K)
                for member in self.slots:
                    if member is not None:
                        if bud.target_len is None:  # (at a target length: its forward pass, measured above)
                            self.compute[member][M.PEAK_MEM_MB] = self.pop_figures[M.PEAK_MEM_MB]
                        events.append(Computed(member, dict(self.compute[member])))
            else:
                self.step()
            self.timer.stop(started, 1.0 / self.K)
            for k, member in enumerate(self.slots):
                if member is not None:
                    self.steps[k] += 1
            out_of_time = self.deadline is not None and time.perf_counter() > self.deadline
            at_rung = [k for k, m in enumerate(self.slots) if m is not None and self.steps[k] in rungs]
            if not (at_rung or out_of_time or self._steps_run % SYNC_EVERY == 0):
                continue
            # a check: one read of the losses; diverged members end, failed, at the step they diverged
            values, bad_steps, bad_losses = torch.stack([self.last_loss, self.bad_step, self.bad_loss]).tolist()
            self.train_s += self.timer.settle()  # (the read above waited for the device)
            freed: list[int] = []
            for k, member in enumerate(self.slots):
                if member is None:
                    continue
                self._last_loss[member] = values[k]
                if bad_steps[k] > 0:
                    at = int(bad_steps[k])
                    self._last_loss[member] = bad_losses[k]
                    why = f"non-finite training loss ({bad_losses[k]}) at step {at}"
                    events.append(Ended(member, self._result(k, member, M.FAILED, why, bad_losses[k], at)))
                    freed.append(k)
            at_rung = [k for k in at_rung if k not in freed]
            evaluated = (
                at_rung
                if not out_of_time
                else [k for k, m in enumerate(self.slots) if m is not None and k not in freed]
            )
            self._pending, self._freed, self._out_of_time = evaluated, freed, out_of_time
            if evaluated:
                t0 = time.perf_counter()
                accs = self.accuracies()
                self.eval_s += (time.perf_counter() - t0) / self.K
                for k in evaluated:
                    member = self.slots[k]
                    assert member is not None
                    self.curves[member].append((self.steps[k], accs[k]))
                    events.append(Rung(member, self.steps[k], accs[k]))
                return events  # the stops for these rungs come before the next advance
            if freed or out_of_time:
                return events + self._resolve()
            self._pending = None
        return events

    def _resolve(self) -> list[PopulationEvent]:
        """The members at the pending check's rungs end where they were stopped or their budget
        ended; every slot freed at the check is announced (unless the time limit ended it all)."""
        events: list[PopulationEvent] = []
        evaluated, freed, out_of_time = self._pending or [], list(self._freed), self._out_of_time
        self._pending, self._freed = None, []
        for k in evaluated:
            member = self.slots[k]
            assert member is not None
            if member in self._stops:
                why = self._stops.pop(member) or f"stopped by the reporter at step {self.steps[k]}"
                events.append(Ended(member, self._result(k, member, M.PRUNED, why, self._last_loss[member],
                                                         self.steps[k])))  # fmt: skip
                freed.append(k)
            elif self.steps[k] == self.bud.steps or out_of_time:
                reason = (
                    None
                    if not out_of_time
                    else f"time limit of {self.bud.time_limit_s}s reached at step {self.steps[k]}"
                )
                events.append(Ended(member, self._result(k, member, M.COMPLETE, reason, self._last_loss[member],
                                                         self.steps[k])))  # fmt: skip
                freed.append(k)
        self._stops.clear()
        for k in freed:
            self.slots[k] = None
        if out_of_time:
            return events
        for k in freed:
            self._free(k)
            self._announced.add(k)
            events.append(Freed(k))
        return events

    def _compact(self, live: list[int]) -> None:
        """Keep only the slots ``live`` (in order): nothing will refill the free ones, so they stop
        costing compute. On the CPU at once; where FlexAttention is compiled (CUDA) once half the
        slots are free (a new size is a new kernel there, so a population shrinks at most log2(K)
        times)."""
        self.tick()
        index = torch.tensor(live, device=self.dev)
        self.opt.keep(index)
        self.model.keep_members(live)
        self.rows, self.lr, self.smoothing, self.step_of, self.live, self.last_loss, self.bad_step, self.bad_loss = (
            t.index_select(0, index)
            for t in (self.rows, self.lr, self.smoothing, self.step_of, self.live, self.last_loss, self.bad_step,
                      self.bad_loss)
        )  # fmt: skip
        self.slots = [self.slots[k] for k in live]
        self.configs = [self.configs[k] for k in live]
        self.steps = [self.steps[k] for k in live]
        self.K = len(live)
        self.slot_range = torch.arange(self.K, device=self.dev)

    def tick(self) -> None:
        """Charge the wall time since the last tick to the members training now, in equal shares."""
        now = time.perf_counter()
        self.wall_s += (now - self.clock) / self.K
        self.clock = now

    def _free(self, k: int) -> None:
        with torch.no_grad():
            self.live[k] = 0.0

    def _admit(self, k: int, member: int, config: AttentionConfig) -> None:
        """Slot ``k`` starts ``config`` from step 0 with fresh weights and optimiser state."""
        self.slots[k], self.configs[k] = member, config
        self.model.set_member(k, config)
        self.opt.reset(k)
        with torch.no_grad():
            self.rows[k] = _batch_rows(config.seed, self.n_train, self.batch, self.bud.steps).to(self.dev)
            self.lr[k] = self._lrs(config).to(self.dev)
            self.smoothing[k] = config.label_smoothing
            self.step_of[k] = 0
            self.live[k] = 1.0
            self.bad_step[k] = 0.0
        self.steps[k] = 0
        self.curves[member] = []
        self.tick()
        self.admitted[member] = (self.wall_s, self.train_s, self.eval_s)
        self.compute[member] = self._figures(config)
        if self.bud.target_len is None:
            self.compute[member].setdefault(M.PEAK_MEM_MB, self.pop_figures.get(M.PEAK_MEM_MB, math.nan))
        self._queued.append(Computed(member, dict(self.compute[member])))

    def _result(self, k: int, member: int, state: str, reason: str | None, loss: float, steps: int) -> TrialResult:
        self.tick()
        wall0, train0, eval0 = self.admitted[member]
        curve = self.curves[member]
        compute = self.compute[member]
        compute.setdefault(M.PEAK_MEM_MB, training_state_mb(self.model) / self.K)  # ended before the memory step
        metrics = {
            M.ACCURACY: curve[-1][1] if curve else math.nan,
            **compute,
            M.TRAIN_SECONDS: self.train_s - train0,
            M.EVAL_SECONDS: self.eval_s - eval0,
            M.MEASURE_SECONDS: self.measure_s,
            M.FINAL_LOSS: loss,
            M.STEPS: float(steps),
            M.WALL_SECONDS: self.wall_s - wall0,
        }
        return TrialResult(config=self.configs[k], metrics=metrics, curve=list(curve), state=state, reason=reason,
                           device=str(self.dev), task=self.task.name)  # fmt: skip


def _graphed(dev: torch.device, kernel: str, K: int) -> bool:
    """Whether a population's step is captured: asked for, on CUDA, more than one member, and on
    FlexAttention's path (the dense path builds index lists on the host each step)."""
    return CUDA_GRAPHS and dev.type == "cuda" and K > 1 and kernel in ("auto", "flex")


class _GraphedStep:
    """A population's :meth:`~Population.train_step` as one CUDA graph (``torch.cuda.graph``),
    replayed step after step: one launch instead of hundreds. What makes it valid: the step
    updates every tensor in place (``tests/test_population.py`` checks that it rebinds none) and a
    refill copies into the tensors the graph read. It is captured again after anything that moves
    them: an attention plan dropped (a refill its plan could not hold) or the population shrunk.
    Warm-up steps run eagerly on a side stream first (compiles, lazy allocations), as PyTorch's
    whole-network capture recipe does."""

    WARMUP = 3

    def __init__(self, pop: Population) -> None:
        self.pop = pop
        self.graph: Any = None
        self.key: tuple[int, int] | None = None
        self.eager = 0
        self.out: torch.Tensor | None = None
        self.captures = 0

    def _warm(self) -> torch.Tensor:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            out = self.pop.train_step()
        torch.cuda.current_stream().wait_stream(side)
        return out

    def _capture(self) -> None:
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = self.pop.train_step()

    def __call__(self) -> torch.Tensor:
        model = self.pop.model
        assert isinstance(model, AttentionModel), "only a population of several members is captured"
        key = (self.pop.K, model.plans_dropped())
        if key != self.key:  # tensors moved: what was captured reads stale storage
            self.key, self.graph, self.eager = key, None, 0
        if self.graph is None:
            if self.eager < self.WARMUP:
                self.eager += 1
                return self._warm()
            self._capture()  # (records the step without running it)
            self.captures += 1
        self.graph.replay()
        assert self.out is not None
        return self.out


class _StepTimer:
    """Training time of the steps, in each step's per-member share. On the CPU the host clock; on
    CUDA events recorded around each step and read at the next check (which waits for the device
    anyway), so the time is the GPU's and no step adds a synchronise of its own."""

    def __init__(self, dev: torch.device) -> None:
        self.cuda = dev.type == "cuda"
        self.pending: list[tuple[Any, Any, float]] = []
        self.done = 0.0

    def start(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def stop(self, started: Any, share: float) -> None:
        if not self.cuda:
            self.done += (time.perf_counter() - started) * share
            return
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        self.pending.append((started, end, share))

    def settle(self) -> float:
        """Seconds since the last settle (waits for the last step's end event on CUDA)."""
        if self.pending:
            self.pending[-1][1].synchronize()
        total = self.done + sum(a.elapsed_time(b) / 1000.0 * share for a, b, share in self.pending)
        self.pending, self.done = [], 0.0
        return total


def _batch_rows(seed: int, n_train: int, batch: int, steps: int) -> torch.Tensor:
    """The training rows of each step, ``(steps, batch)``: a permutation from a generator seeded
    with the trial's seed, a new one when the next batch would run past its end."""
    gen = torch.Generator().manual_seed(seed)
    order, cursor, out = torch.randperm(n_train, generator=gen), 0, []
    for _ in range(steps):
        if cursor + batch > n_train:
            order, cursor = torch.randperm(n_train, generator=gen), 0
        out.append(order[cursor : cursor + batch])
        cursor += batch
    return torch.stack(out)


class MemberAdamW:
    """AdamW (``torch.optim.AdamW``'s arithmetic, betas 0.9/0.98) with per-member gradient clipping
    (norm 1, as ``clip_grad_norm_``) for a model whose parameters carry a member axis, each member
    with its own learning rate, weight decay and step count, or for the plain model of a trial of
    one (``member_axis`` false: one member, parameters in their own shapes).

    Why not ``torch.optim.AdamW``: it takes one learning rate and weight decay per parameter group,
    not one per slice of a tensor, and clipping per member is not ``clip_grad_norm_`` either. Here
    every parameter is a view into one flat buffer ``(K, P)``, so a step is about a dozen ops on
    that buffer whatever the number of parameters (on a GPU, a dozen launches; a foreach optimiser
    launches per parameter when the learning rate is a tensor). Weight decay applies to matrices
    only (not biases, LayerNorms or embeddings)."""

    def __init__(self, model: AttentionModel | SingleModel, betas: tuple[float, float] = (0.9, 0.98),
                 eps: float = 1e-8, max_norm: float = 1.0) -> None:  # fmt: skip
        named = list(model.named_parameters())
        self.params = [p for _, p in named]
        self.stacked = model.member_axis  # parameters on a member axis; else one member's, unstacked
        K = self.params[0].shape[0] if self.stacked else 1
        dev = self.params[0].device
        self.flat = torch.cat([p.detach().reshape(K, -1) for p in self.params], dim=1)  # (K, P)
        self._bind()
        matrix = 3 if self.stacked else 2  # dimensions of a weight matrix (with its member axis)
        decays = [torch.full((p.numel() // K,), float(p.dim() >= matrix and "emb" not in name)) for name, p in named]
        self.decay = torch.cat(decays).to(dev).view(1, -1)  # (1, P)
        self.weight_decay = torch.tensor([c.weight_decay for c in model.members], device=dev).view(K, 1)
        self.m = torch.zeros_like(self.flat)
        self.v = torch.zeros_like(self.flat)
        self.t = torch.zeros(K, 1, device=dev)  # each member's step count (bias correction)
        self.betas, self.eps, self.max_norm = betas, eps, max_norm
        self.model = model

    def _bind(self) -> None:
        """Make every parameter a view of its columns of the flat buffer."""
        offset = 0
        K = self.flat.shape[0]
        for p in self.params:
            n = p[0].numel() if self.stacked else p.numel()
            columns = self.flat[:, offset : offset + n]
            p.data = columns.view(K, *p.shape[1:]) if self.stacked else columns.view(p.shape)
            offset += n

    def keep(self, index: torch.Tensor) -> None:
        """Keep only the members ``index`` (in that order), weights and state."""
        self.flat, self.m, self.v, self.t, self.weight_decay = (
            t.index_select(0, index) for t in (self.flat, self.m, self.v, self.t, self.weight_decay)
        )
        self._bind()

    def reset(self, k: int) -> None:
        """Slot ``k`` holds a new member: zero state, its weight decay (its weights: ``init_member``)."""
        with torch.no_grad():
            self.m[k] = 0.0
            self.v[k] = 0.0
            self.t[k] = 0.0
            self.weight_decay[k] = self.model.members[k].weight_decay

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self, lr: torch.Tensor) -> None:
        """One update with each member's learning rate ``lr`` ``(K,)``."""
        K = self.flat.shape[0]
        g = torch.cat([p.grad.reshape(K, -1) for p in self.params], dim=1).float()  # type: ignore[union-attr]  # (K, P)
        norm = torch.linalg.vector_norm(g, dim=1, keepdim=True)  # (K, 1)
        g.mul_(torch.clamp(self.max_norm / (norm + 1e-6), max=1.0))
        b1, b2 = self.betas
        self.t.add_(1.0)
        lr = lr.view(K, 1)
        self.flat.mul_(1.0 - lr * self.weight_decay * self.decay)
        self.m.lerp_(g, 1 - b1)
        self.v.mul_(b2).addcmul_(g, g, value=1 - b2)
        denom = (self.v.sqrt() / (1 - b2**self.t).sqrt()).add_(self.eps)
        self.flat.sub_(lr / (1 - b1**self.t) * self.m / denom)


def measure_at_length(
    config: AttentionConfig,
    task: Task,
    length: int,
    *,
    device: torch.device,
    batch: int,
    kernel: str = "auto",
    member_layout: str = "auto",
) -> dict[str, float]:
    """Compute figures of ``config`` at sequence length ``length`` (``Budget.target_len``):
    analytic ``flops``, ``attn_flops`` and ``attn_tile_flops`` per sequence, and ``latency_ms`` and ``peak_mem_mb`` of one forward pass
    (no gradients) of ``batch`` sequences of random tokens, measured on ``device`` on the model a
    lone trial trains (:func:`model_for`: on the ``auto`` kernel, the plain model the export writes,
    so the latency counted is the deployed layer's). Memory: the weights and the pass's peak, no
    training state. Weights do not change the cost, so a fresh model is measured. Pattern
    parameters are absolute: a window of 46 stays 46 at any length."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # the trial's draws stay its own
        torch.manual_seed(config.seed)
        model = model_for([config], task, kernel=kernel, member_layout=member_layout).to(device).eval()
        if isinstance(model, AttentionModel):
            model.max_len = length
        x = torch.randint(0, max(1, task.vocab_size), (batch, length), device=device)

    def forward() -> None:
        with torch.no_grad(), _autocast(device):
            model(x)

    latency, spread = measure_latency(forward, device=device)
    _, peak = peak_memory_mb(forward, device=device)
    weights_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    return {M.FLOPS: float(model_flops(config, seq_len=length, n_classes=task.n_classes)),
            M.ATTN_FLOPS: float(model_attention_flops(config, seq_len=length)),
            M.ATTN_TILE_FLOPS: float(model_attention_tile_flops(config, seq_len=length)), M.LATENCY_MS: latency,
            M.LATENCY_SPREAD: spread, M.PEAK_MEM_MB: weights_mb + (0.0 if math.isnan(peak) else peak)}  # fmt: skip


def at_own_length(bud: Budget, task: Task) -> Budget:
    """``bud`` without a ``target_len`` where it is the task's own length: the figures at the task's
    length are the trial's own (population latency, training-step memory), as without a target
    length, not a fresh model's forward pass (what ``attn-search record`` asks for by default)."""
    return dataclasses.replace(bud, target_len=None) if bud.target_len == task.seq_len else bud


def target_batch(bud: Budget, seq_len: int) -> int:
    """Sequences per timed forward pass at ``bud.target_len``: the tokens of ``latency_batch``
    sequences of the task's length, at least one sequence."""
    assert bud.target_len is not None
    return max(1, bud.latency_batch * seq_len // bud.target_len)


def _resolve_budget(budget: Budget | str | int | None) -> Budget:
    if budget is None:
        return PRESETS["default"]
    if isinstance(budget, Budget):
        return budget
    if isinstance(budget, str):
        if budget not in PRESETS:
            raise ValueError(f"budget preset {budget!r} is unknown: use one of {', '.join(PRESETS)}")
        return PRESETS[budget]
    if isinstance(budget, int) and not isinstance(budget, bool):
        return dataclasses.replace(PRESETS["default"], steps=budget)
    raise ValueError(f"budget={budget!r} is invalid: give a Budget, a preset name or a step count")
