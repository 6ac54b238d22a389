"""One trial: build the model a config describes, train it on a task for a budget, measure it.

``evaluate(config, task, budget=..., reporter=...)`` is the training evaluator every strategy and
backend calls. It reports held-out accuracy at rungs to ``reporter(step, accuracy)``, which may
stop the trial early (return ``True`` or raise :class:`StopTrial`): an Optuna objective calls
``trial.report`` and answers ``trial.should_prune()``; a Ray Tune function reports and is stopped
by the scheduler. A non-finite loss ends the trial with ``state="failed"`` and a reason.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

from attn_search.engine import metrics as M
from attn_search.engine.config import AttentionConfig
from attn_search.engine.cost import measure_latency, model_flops, peak_memory_mb, training_state_mb
from attn_search.engine.model import AttentionModel, build_model, count_params, loss_fn
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


def make_optimizer(model: torch.nn.Module, config: AttentionConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not biases, LayerNorms or embeddings)."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 and "emb" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.98))


def lr_factor(step: int, *, warmup: int, total: int) -> float:
    """Linear warm-up to 1, then cosine decay to 0.1 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


@torch.no_grad()
def accuracy(
    model: AttentionModel, x: torch.Tensor, y: torch.Tensor, *, device: torch.device, batch: int = 256
) -> float:
    """Fraction of scored positions (``y != -100``) predicted right."""
    was_training = model.training
    model.eval()
    right = total = 0
    for i in range(0, len(x), batch):
        xb, yb = x[i : i + batch].to(device), y[i : i + batch].to(device)
        with _autocast(device):
            pred = model(xb).argmax(dim=-1)
        scored = yb != IGNORE
        right += int((pred[scored] == yb[scored]).sum())
        total += int(scored.sum())
    model.train(was_training)
    return right / max(1, total)


def evaluate(
    config: AttentionConfig | Mapping[str, Any],
    task: str | Task = "mqar",
    *,
    budget: Budget | str | int | None = None,
    seed: int | None = None,
    device: str | torch.device = "auto",
    reporter: Reporter | None = None,
    task_kwargs: Mapping[str, Any] | None = None,
    backend: str = "auto",
    on_compute: Callable[[dict[str, float]], None] | None = None,
) -> TrialResult:
    """Train ``config`` on ``task`` for ``budget`` and measure it.

    Args:
        config: an :class:`AttentionConfig` or a mapping of its fields.
        task: a task name, a ``module:callable`` path or a :class:`~attn_search.engine.tasks.Task`.
        budget: a :class:`Budget`, a preset name (``smoke``, ``default``, ``full``) or a step count.
        seed: overrides ``config.seed`` (initialisation, data order, dropout).
        device: ``auto``, ``cpu`` or ``cuda``. On CUDA the model trains under bf16 autocast.
        reporter: called as ``reporter(step, accuracy)`` at each rung; ``True`` or
            :class:`StopTrial` stops the trial (``state="pruned"``).
        task_kwargs: passed to the task's constructor (``seq_len``, ``seed``, ...).
        backend: attention backend for every layer (``auto`` picks per device and pattern).
        on_compute: called once, before the first rung, with the compute metrics (``flops``,
            ``params``, ``latency_ms``, ``peak_mem_mb``), so that early stopping can weigh them.

    Returns:
        A :class:`TrialResult`. Same seed on CPU gives the same accuracy and curve. The caller's
        random state (torch's global generators, which an RL agent samples its actions from) is
        left as it was: the trial seeds and draws inside a fork of it.
    """
    dev = resolve_device(device)
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        return _evaluate(config, task, budget=budget, seed=seed, dev=dev, reporter=reporter,
                         task_kwargs=task_kwargs, backend=backend, on_compute=on_compute)  # fmt: skip


def _evaluate(
    config: AttentionConfig | Mapping[str, Any],
    task: str | Task,
    *,
    budget: Budget | str | int | None,
    seed: int | None,
    dev: torch.device,
    reporter: Reporter | None,
    task_kwargs: Mapping[str, Any] | None,
    backend: str,
    on_compute: Callable[[dict[str, float]], None] | None,
) -> TrialResult:
    wall_start = time.perf_counter()
    cfg = config if isinstance(config, AttentionConfig) else AttentionConfig.from_dict(dict(config))
    if seed is not None:
        cfg = cfg.replace(seed=seed)
    bud = _resolve_budget(budget)
    the_task = make_task(task, **dict(task_kwargs or {}))

    torch.manual_seed(cfg.seed)
    model = build_model(cfg, the_task, backend=backend).to(dev)
    n_train = min(bud.steps * cfg.batch_size, bud.max_train_examples)
    x_train, y_train = the_task.data("train", n_train)
    x_eval, y_eval = the_task.data("eval", bud.n_eval)
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = make_optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, warmup=cfg.warmup_steps, total=bud.steps))
    lat_x = x_eval[: bud.latency_batch].to(dev)

    def forward() -> None:
        with torch.no_grad(), _autocast(dev):
            model(lat_x)

    # Latency does not depend on the weights: measured before training, so it is known at rungs.
    t0 = time.perf_counter()
    model.eval()
    compute: dict[str, float] = {M.PARAMS: float(count_params(model))}
    if bud.target_len is None:
        latency, spread = measure_latency(forward, device=dev)
        compute.update({M.FLOPS: float(model_flops(cfg, seq_len=the_task.seq_len, n_classes=the_task.n_classes)),
                        M.LATENCY_MS: latency, M.LATENCY_SPREAD: spread})  # fmt: skip
    else:  # compute where the user deploys; accuracy where it trains
        compute.update(measure_at_length(cfg, the_task, bud.target_len, device=dev, backend=backend,
                                         batch=target_batch(bud, the_task.seq_len)))  # fmt: skip
    measure_s = time.perf_counter() - t0
    rungs = set(bud.rung_steps())
    # Step 2 (after step 1 allocated the optimizer state and warmed up), but never after the first
    # rung: the compute figures must be known when the first accuracy is reported.
    memory_step = min(2, min(rungs))
    curve: list[tuple[int, float]] = []
    state, reason = M.COMPLETE, None
    order = torch.randperm(len(x_train), generator=gen)
    cursor = 0
    train_s = eval_s = 0.0
    step_peak_mb = math.nan
    last_loss = math.nan

    def train_step(xb: torch.Tensor, yb: torch.Tensor) -> float:
        with _autocast(dev):
            loss = loss_fn(model(xb), yb, label_smoothing=cfg.label_smoothing)
        value = float(loss.detach())
        if not math.isfinite(value):
            return value
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        return value

    model.train()
    step = 0
    for step in range(1, bud.steps + 1):
        if cursor + cfg.batch_size > len(order):
            order, cursor = torch.randperm(len(x_train), generator=gen), 0
        idx = order[cursor : cursor + cfg.batch_size]
        cursor += cfg.batch_size
        xb, yb = x_train[idx].to(dev), y_train[idx].to(dev)
        t0 = time.perf_counter()
        if step == memory_step:
            last_loss, step_peak_mb = peak_memory_mb(functools.partial(train_step, xb, yb), device=dev)
            if bud.target_len is None:  # (at a target length: the forward pass's, measured above)
                compute[M.PEAK_MEM_MB] = training_state_mb(model) + (0.0 if math.isnan(step_peak_mb) else step_peak_mb)
            if on_compute is not None:
                on_compute(dict(compute))
        else:
            last_loss = train_step(xb, yb)
        train_s += time.perf_counter() - t0
        if not math.isfinite(last_loss):
            state, reason = M.FAILED, f"non-finite training loss ({last_loss}) at step {step}"
            break
        out_of_time = bud.time_limit_s is not None and time.perf_counter() - wall_start > bud.time_limit_s
        if step in rungs or out_of_time:
            t0 = time.perf_counter()
            acc = accuracy(model, x_eval, y_eval, device=dev)
            eval_s += time.perf_counter() - t0
            curve.append((step, acc))
            if reporter is not None:
                try:
                    stop = reporter(step, acc)
                except StopTrial as exc:
                    state, reason, stop = M.PRUNED, str(exc) or f"stopped by the reporter at step {step}", True
                else:
                    if stop:
                        state, reason = M.PRUNED, f"stopped by the reporter at step {step}"
                if stop:
                    break
        if out_of_time:
            reason = f"time limit of {bud.time_limit_s}s reached at step {step}"
            break

    compute.setdefault(M.PEAK_MEM_MB, training_state_mb(model))  # failed before the memory step
    metrics = {
        M.ACCURACY: curve[-1][1] if curve else math.nan,
        **compute,
        M.TRAIN_SECONDS: train_s,
        M.EVAL_SECONDS: eval_s,
        M.MEASURE_SECONDS: measure_s,
        M.FINAL_LOSS: last_loss,
        M.STEPS: float(step),
    }
    metrics[M.WALL_SECONDS] = time.perf_counter() - wall_start
    return TrialResult(
        config=cfg, metrics=metrics, curve=curve, state=state, reason=reason, device=str(dev), task=the_task.name
    )


def measure_at_length(
    config: AttentionConfig, task: Task, length: int, *, device: torch.device, batch: int, backend: str = "auto"
) -> dict[str, float]:
    """Compute figures of ``config`` at sequence length ``length`` (``Budget.target_len``):
    analytic ``flops`` per sequence, and ``latency_ms`` and ``peak_mem_mb`` of one forward pass
    (no gradients) of ``batch`` sequences of random tokens, measured on ``device`` with the
    attention backend a trial uses (memory: the weights and the pass's peak, no training state). Weights do not change the cost, so a fresh model is measured.
    Pattern parameters are absolute: a window of 46 stays 46 at any length."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # the trial's draws stay its own
        torch.manual_seed(config.seed)
        model = AttentionModel(config, vocab_size=task.vocab_size, n_classes=task.n_classes, max_len=length,
                               backend=backend).to(device).eval()  # fmt: skip
        x = torch.randint(0, max(1, task.vocab_size), (batch, length), device=device)

    def forward() -> None:
        with torch.no_grad(), _autocast(device):
            model(x)

    latency, spread = measure_latency(forward, device=device)
    _, peak = peak_memory_mb(forward, device=device)
    weights_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    return {M.FLOPS: float(model_flops(config, seq_len=length, n_classes=task.n_classes)), M.LATENCY_MS: latency,
            M.LATENCY_SPREAD: spread, M.PEAK_MEM_MB: weights_mb + (0.0 if math.isnan(peak) else peak)}  # fmt: skip


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
