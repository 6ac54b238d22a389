"""Population training: many configurations of one shape trained as one fused model.

A trial of the default space is a 1-layer, 64-wide model: on a GPU each of its steps is a few
hundred tiny kernels, and the card idles while Python launches them. HFTA (Wang et al., MLSys
2021) fuses same-shaped models into one set of kernels instead; here the *members* of a
population share ``d_model``, ``n_layers``, ``n_heads``, ``batch_size``, ``causal`` and the task,
and everything else is theirs: learning rate, warm-up, weight decay, dropout, attention dropout,
label smoothing, seed and attention pattern.

* Weights are stacked on a leading member axis, ``(K, in, out)``; every layer is one batched op
  for all members (``baddbmm``), shapes carry the member axis (``# (K, B, L, C)``).
* Each member's pattern is a row of a mask table ``(K, L, L)``: FlexAttention's ``mask_mod``
  reads ``table[b, q, kv]`` with the batch index as the member, so one compiled kernel serves every
  pattern (no compile per pattern, as one-by-one trials pay), and the BlockMask, the rotary tables
  and every per-member constant are built once per population, outside the step.
* The optimiser is AdamW written for stacked tensors with a learning rate and weight decay per
  member; gradients are clipped per member; the loss is each member's own (label smoothing per
  member) and their sum is minimised (members share no parameter, so gradients do not mix).
* A member stopped by the reporter, or whose loss stops being finite, leaves the population:
  every stacked tensor and optimiser state is cut down, so it stops costing compute.

Each member's result means what :func:`~attn_search.engine.trainer.evaluate` returns for its config:
same initial weights (built from the member's seed), same data order, same schedule, same
optimiser arithmetic; accuracy and FLOPs/params are the member's own. Time and memory cannot be
split exactly: ``latency_ms``, ``train_seconds`` and ``wall_seconds`` are the population's divided
by its size, and ``peak_mem_mb`` is the member's training state plus its share of the population's
measured step peak. Dropout masks come from one generator seeded by the members' seeds, so members
with dropout agree with their one-by-one runs only statistically (see the tests for the tolerance).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from attn_search.engine import metrics as M
from attn_search.engine.attention import _flex
from attn_search.engine.config import AttentionConfig
from attn_search.engine.cost import measure_latency, model_flops, peak_memory_mb, training_state_mb
from attn_search.engine.model import AttentionModel, apply_rotary, build_model, rotary_tables
from attn_search.engine.patterns import pattern_mask
from attn_search.engine.tasks import IGNORE, Task, make_task
from attn_search.engine.trainer import (
    Budget,
    StopTrial,
    TrialResult,
    _autocast,
    _resolve_budget,
    lr_factor,
    measure_at_length,
    resolve_device,
    target_batch,
)

SYNC_EVERY = 50
"""Steps between reads of the members' losses from the device besides rungs (a diverged member is
failed at the next read; until then it trains on, alone, on non-finite weights)."""

MemberReporter = Callable[[int, int, float], "bool | None"]
"""``reporter(member, step, accuracy)``: ``member`` indexes the ``configs`` given to
:func:`evaluate_many`; returning ``True`` (or raising :class:`StopTrial`) stops that member."""
RungReporter = Callable[[int, Sequence[tuple[int, float]]], Sequence[bool]]
"""``report_rungs(step, [(member, accuracy), ...])``: every member's rung of one step at once;
returns one stop flag per member, in order. One call per step lets a remote worker ask the search's
early-stopping rule once per rung instead of once per member (see ``backends.ray_tune``)."""


def _per_member(reporter: MemberReporter) -> RungReporter:
    def report_rungs(step: int, rungs: Sequence[tuple[int, float]]) -> list[bool]:
        stops = []
        for member, accuracy in rungs:
            try:
                stops.append(bool(reporter(member, step, accuracy)))
            except StopTrial:
                stops.append(True)
        return stops

    return report_rungs


def shape_key(config: AttentionConfig) -> tuple[Any, ...]:
    """What members of one population must share (everything else can differ)."""
    return (config.d_model, config.n_layers, config.n_heads, config.batch_size, config.causal)


def _stack(tensors: Sequence[torch.Tensor]) -> nn.Parameter:
    return nn.Parameter(torch.stack([t.detach().clone() for t in tensors]))


class PopulationModel(nn.Module):
    """``K`` :class:`AttentionModel` s of one shape as one module; ``forward(idx (K, B, L))`` gives
    logits ``(K, B, L, n_classes)``. Built from the members' own models, so a member's initial
    weights are exactly those :func:`~attn_search.engine.model.build_model` gives it."""

    def __init__(self, members: Sequence[AttentionModel], masks: torch.Tensor) -> None:
        super().__init__()
        first = members[0].config
        self.K, self.C, self.H = len(members), first.d_model, first.n_heads
        self.n_layers = first.n_layers
        self.tok_emb = _stack([m.tok_emb.weight for m in members])  # (K, V, C)
        self.prev_emb = _stack([m.prev_emb.weight for m in members])  # (K, V, C)
        for i in range(self.n_layers):
            blocks: list[Any] = [m.blocks[i] for m in members]
            self._linear(f"qkv{i}", [b.attn.qkv for b in blocks])
            self._linear(f"proj{i}", [b.attn.proj for b in blocks])
            self._linear(f"fc{i}", [b.mlp[0] for b in blocks])
            self._linear(f"out{i}", [b.mlp[2] for b in blocks])
            self._norm(f"ln1_{i}", [b.ln1 for b in blocks])
            self._norm(f"ln2_{i}", [b.ln2 for b in blocks])
        self._norm("ln_f", [m.ln_f for m in members])
        self._linear("head", [m.head for m in members])
        self.masks: torch.Tensor
        self.register_buffer("masks", masks, persistent=False)  # (K, L, L) bool: each member's pattern

    def _linear(self, name: str, layers: Sequence[nn.Linear]) -> None:
        self.register_parameter(f"{name}_w", _stack([lin.weight.t() for lin in layers]))  # (K, in, out)
        self.register_parameter(f"{name}_b", _stack([lin.bias for lin in layers]))  # (K, out)

    def _norm(self, name: str, norms: Sequence[nn.LayerNorm]) -> None:
        self.register_parameter(f"{name}_w", _stack([n.weight for n in norms]))  # (K, C)
        self.register_parameter(f"{name}_b", _stack([n.bias for n in norms]))  # (K, C)

    def p(self, name: str) -> torch.Tensor:
        return self.get_parameter(name)

    def keep(self, members: torch.Tensor) -> None:
        """Keep only ``members`` (indices into the member axis), in that order."""
        with torch.no_grad():
            for param in self.parameters():
                param.data = param.data.index_select(0, members)
            self.masks = self.masks.index_select(0, members)
        self.K = len(members)

    # -- ops with a member axis ----------------------------------------------------------------
    def linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        K, B, L, _ = x.shape
        w, b = self.p(f"{name}_w"), self.p(f"{name}_b")  # (K, in, out), (K, out)
        y = torch.baddbmm(b.unsqueeze(1), x.reshape(K, B * L, -1), w)  # (K, B*L, out): one op for all members
        return y.view(K, B, L, -1)  # (K, B, L, out)

    def norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        w, b = self.p(f"{name}_w"), self.p(f"{name}_b")  # (K, C)
        y = F.layer_norm(x, (x.shape[-1],), eps=1e-5)
        return y * w[:, None, None, :] + b[:, None, None, :]  # (K, B, L, C)

    def forward(
        self,
        idx: torch.Tensor,
        *,
        dropout: torch.Tensor | None,
        attn_dropout: torch.Tensor | None,
        block_mask: Any = None,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        K, B, L = idx.shape
        V = self.tok_emb.shape[1]
        offset = (torch.arange(K, device=idx.device) * V)[:, None, None]  # member k's rows of the flat table
        prev = F.pad(idx[..., :-1], (1, 0))  # (K, B, L): token at t-1, 0 at t=0
        x = F.embedding(idx + offset, self.tok_emb.reshape(K * V, -1)) + F.embedding(
            prev + offset, self.prev_emb.reshape(K * V, -1)
        )  # (K, B, L, C)
        x = _dropout(x, dropout, generator)
        cos, sin = rotary if rotary is not None else rotary_tables(L, self.C // self.H, device=idx.device)
        for i in range(self.n_layers):
            x = x + _dropout(self.linear(self._attend(self.norm(x, f"ln1_{i}"), i, attn_dropout, block_mask, cos, sin,
                                                      generator), f"proj{i}"), dropout, generator)  # fmt: skip
            h = F.gelu(self.linear(self.norm(x, f"ln2_{i}"), f"fc{i}"))
            x = x + _dropout(self.linear(h, f"out{i}"), dropout, generator)
        return self.linear(self.norm(x, "ln_f"), "head")  # (K, B, L, n_classes)

    def _attend(
        self, x: torch.Tensor, i: int, attn_dropout: torch.Tensor | None, block_mask: Any, cos: torch.Tensor,
        sin: torch.Tensor, generator: torch.Generator | None,
    ) -> torch.Tensor:  # fmt: skip
        K, B, L, C = x.shape
        H, D = self.H, C // self.H
        q, k, v = self.linear(x, f"qkv{i}").split(C, dim=-1)  # 3 x (K, B, L, C)
        q, k, v = (
            t.view(K, B, L, H, D).permute(0, 1, 3, 2, 4).reshape(K, B * H, L, D) for t in (q, k, v)
        )  # (K, BH, L, D)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if self.training and attn_dropout is not None:
            y = _attention_with_dropout(q, k, v, self.masks, attn_dropout, generator)
        elif block_mask is not None:
            y = _flex(q, k, v, block_mask)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=self.masks[:, None])  # mask (K, 1, L, L)
        return y.view(K, B, H, L, D).permute(0, 1, 3, 2, 4).reshape(K, B, L, C)  # (K, B, L, C)


def _dropout(x: torch.Tensor, p: torch.Tensor | None, generator: torch.Generator | None) -> torch.Tensor:
    """Inverted dropout with each member's rate ``p`` ``(K,)``; ``None`` (no member drops) is the identity."""
    if p is None or not torch.is_grad_enabled():
        return x
    keep = torch.rand(x.shape, device=x.device, generator=generator) >= p.view(-1, *([1] * (x.dim() - 1)))
    return x * keep / (1.0 - p).view(-1, *([1] * (x.dim() - 1))).to(x.dtype)


def _attention_with_dropout(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, masks: torch.Tensor, p: torch.Tensor,
    generator: torch.Generator | None,
) -> torch.Tensor:  # fmt: skip
    """Masked attention with each member's attention dropout (no fused kernel takes a rate per
    batch row): scores are materialised, ``(K, BH, L, L)``."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    s = torch.matmul(q, k.transpose(-1, -2)) * scale  # (K, BH, L, L)
    s = s.masked_fill(~masks[:, None], float("-inf"))
    a = torch.softmax(s.float(), dim=-1).to(q.dtype)
    a = _dropout(a, p, generator)
    return torch.matmul(a, v)  # (K, BH, L, D)


def _mask(config: AttentionConfig, seq_len: int) -> torch.Tensor:
    params: dict[str, Any] = dict(config.pattern_params())
    return pattern_mask(config.pattern, seq_len, causal=config.causal, **params)


def _batch_rows(seed: int, n_train: int, batch: int, steps: int) -> torch.Tensor:
    """The training rows of each step, ``(steps, batch)``, in the order the one-by-one trainer
    draws them: a permutation from a generator seeded with the trial's seed, a new one when the
    next batch would run past its end."""
    gen = torch.Generator().manual_seed(seed)
    order, cursor, out = torch.randperm(n_train, generator=gen), 0, []
    for _ in range(steps):
        if cursor + batch > n_train:
            order, cursor = torch.randperm(n_train, generator=gen), 0
        out.append(order[cursor : cursor + batch])
        cursor += batch
    return torch.stack(out)


def member_mask_mod(masks: torch.Tensor) -> Callable[..., torch.Tensor]:
    """FlexAttention's ``mask_mod`` for a population: the batch index is the member, and the rule
    reads that member's row of the flattened mask table. Pointwise (one computed index, no copy or
    reduction), and the table stays on the device ``masks`` lives on, as CUDA's lowering needs."""
    K, L, _ = masks.shape
    flat = masks.reshape(-1)  # (K * L * L,)

    def mask_mod(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        # positions past L (FlexAttention evaluates whole tiles) read the last row/column: masked by padding
        return flat[b * (L * L) + torch.clamp(q, max=L - 1) * L + torch.clamp(kv, max=L - 1)]

    return mask_mod


def member_block_mask(masks: torch.Tensor) -> Any:
    """One BlockMask for a population (:func:`member_mask_mod`), built once per population."""
    from torch.nn.attention.flex_attention import create_block_mask

    K, L, _ = masks.shape
    return create_block_mask(member_mask_mod(masks), K, None, L, L, device=str(masks.device))


class MemberAdamW:
    """AdamW over stacked parameters with a learning rate and weight decay per member: the
    arithmetic of ``torch.optim.AdamW`` (decoupled decay first, bias-corrected moments), so a
    member's update equals the one-by-one trial's. Weight decay applies to matrices only (not
    biases, norms or embeddings), as :func:`~attn_search.engine.trainer.make_optimizer` does."""

    def __init__(self, model: PopulationModel, weight_decay: torch.Tensor, betas: tuple[float, float] = (0.9, 0.98),
                 eps: float = 1e-8) -> None:  # fmt: skip
        self.model = model
        self.params = [(name, p) for name, p in model.named_parameters()]
        self.decay = {name: p.dim() >= 3 and "emb" not in name for name, p in self.params}  # a member's dim >= 2
        self.weight_decay = weight_decay
        self.betas, self.eps = betas, eps
        self.state = {name: (torch.zeros_like(p), torch.zeros_like(p)) for name, p in self.params}
        self.t = 0

    def keep(self, members: torch.Tensor) -> None:
        self.params = [(name, p) for name, p in self.model.named_parameters()]
        self.state = {n: (m.index_select(0, members), v.index_select(0, members)) for n, (m, v) in self.state.items()}
        self.weight_decay = self.weight_decay.index_select(0, members)

    @torch.no_grad()
    def step(self, lr: torch.Tensor) -> None:
        self.t += 1
        b1, b2 = self.betas
        c1, c2 = 1 - b1**self.t, 1 - b2**self.t
        for name, p in self.params:
            if p.grad is None:
                continue
            shape = (-1, *([1] * (p.dim() - 1)))
            lr_k = lr.view(shape).to(p.dtype)
            if self.decay[name]:
                p.mul_(1 - lr_k * self.weight_decay.view(shape).to(p.dtype))
            m, v = self.state[name]
            m.lerp_(p.grad, 1 - b1)
            v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
            denom = (v.sqrt() / math.sqrt(c2)).add_(self.eps)
            p.sub_(lr_k / c1 * m / denom)

    def zero_grad(self) -> None:
        for _, p in self.params:
            p.grad = None


def _clip_per_member(model: PopulationModel, max_norm: float = 1.0) -> None:
    """``clip_grad_norm_`` for each member separately (norm over that member's slices)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    sq = torch.stack([g.float().pow(2).reshape(g.shape[0], -1).sum(1) for g in grads]).sum(0)  # (K,)
    coef = torch.clamp(max_norm / (sq.sqrt() + 1e-6), max=1.0)
    for g in grads:
        g.mul_(coef.view(-1, *([1] * (g.dim() - 1))).to(g.dtype))


def _member_loss(logits: torch.Tensor, y: torch.Tensor, smoothing: torch.Tensor) -> torch.Tensor:
    """Each member's cross-entropy over its scored positions, with its own label smoothing: ``(K,)``."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # (K, B, L, n_classes)
    scored = y != IGNORE  # (K, B, L)
    target = y.clamp(min=0)
    nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)  # (K, B, L)
    smooth = -logp.mean(-1)  # (K, B, L)
    eps = smoothing.view(-1, 1, 1)
    per = ((1 - eps) * nll + eps * smooth) * scored
    return per.flatten(1).sum(1) / scored.flatten(1).sum(1).clamp(min=1)


def evaluate_many(
    configs: Sequence[AttentionConfig | Mapping[str, Any]],
    task: str | Task = "mqar",
    *,
    budget: Budget | str | int | None = None,
    device: str | torch.device = "auto",
    reporter: MemberReporter | None = None,
    task_kwargs: Mapping[str, Any] | None = None,
    on_compute: Callable[[int, dict[str, float]], None] | None = None,
    report_rungs: RungReporter | None = None,
) -> list[TrialResult]:
    """Train several configurations at once; returns, in the order given, what
    :func:`~attn_search.engine.trainer.evaluate` would return for each (see the module docstring).

    Configurations that share :func:`shape_key` train as one population; the others form
    populations of their own. A population of one is an ordinary :func:`evaluate` call. The
    caller's random state is left as it was.

    Args:
        configs: configurations (or mappings of their fields).
        task, budget, device, task_kwargs: as for ``evaluate``.
        reporter: ``reporter(member, step, accuracy)`` at each rung; ``True`` stops that member.
        on_compute: ``on_compute(member, figures)`` once per member, before its first rung.
        report_rungs: instead of ``reporter``, all of a step's rungs in one call (:data:`RungReporter`).
    """
    if reporter is not None and report_rungs is not None:
        raise ValueError("give reporter or report_rungs, not both")
    if reporter is not None:
        report_rungs = _per_member(reporter)
    from attn_search.engine.trainer import evaluate

    cfgs = [c if isinstance(c, AttentionConfig) else AttentionConfig.from_dict(dict(c)) for c in configs]
    dev = resolve_device(device)
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, c in enumerate(cfgs):
        groups.setdefault(shape_key(c), []).append(i)
    results: list[TrialResult | None] = [None] * len(cfgs)
    for members in groups.values():
        if len(members) == 1:
            i = members[0]
            results[i] = evaluate(
                cfgs[i], task, budget=budget, device=dev, task_kwargs=task_kwargs,
                reporter=(lambda step, acc, i=i: report_rungs(step, [(i, acc)])[0]) if report_rungs else None,  # type: ignore[misc]
                on_compute=(lambda fig, i=i: on_compute(i, fig)) if on_compute else None,  # type: ignore[misc]
            )  # fmt: skip
            continue
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            out = _train_population([cfgs[i] for i in members], task, _resolve_budget(budget), dev,
                                    task_kwargs, members, report_rungs, on_compute)  # fmt: skip
        for i, r in zip(members, out, strict=True):
            results[i] = r
    return [r for r in results if r is not None]


def _train_population(
    cfgs: list[AttentionConfig], task: str | Task, bud: Budget, dev: torch.device,
    task_kwargs: Mapping[str, Any] | None, ids: list[int], report_rungs: RungReporter | None,
    on_compute: Callable[[int, dict[str, float]], None] | None,
) -> list[TrialResult]:  # fmt: skip
    wall_start = time.perf_counter()
    the_task = make_task(task, **dict(task_kwargs or {}))
    K0, L = len(cfgs), the_task.seq_len
    models = []
    for c in cfgs:
        torch.manual_seed(c.seed)  # each member's initial weights are those of its own trial
        models.append(build_model(c, the_task))
    masks = torch.stack([_mask(c, L) for c in cfgs]).to(dev)
    model = PopulationModel(models, masks).to(dev)
    batch = cfgs[0].batch_size
    n_train = min(bud.steps * batch, bud.max_train_examples)
    x_train, y_train = the_task.data("train", n_train)
    x_eval, y_eval = the_task.data("eval", bud.n_eval)
    x_train, y_train, x_eval, y_eval = (t.to(dev) for t in (x_train, y_train, x_eval, y_eval))
    # every step's batch rows and learning rate, for every member, on the device before the first
    # step: the loop below indexes tables instead of running Python per member
    rows_table = torch.stack([_batch_rows(c.seed, n_train, batch, bud.steps) for c in cfgs]).to(dev)  # (K, S, B)
    drop_gen = torch.Generator(device=dev).manual_seed(hash(tuple(c.seed for c in cfgs)) % 2**63)
    as_t = lambda vals: torch.tensor(vals, device=dev, dtype=torch.float32)  # noqa: E731
    dropout, attn_dropout = as_t([c.dropout for c in cfgs]), as_t([c.attn_dropout for c in cfgs])
    # whether any member drops is known here, not read back from the device in every layer of every
    # step (on CUDA each such read waits for the GPU); it changes only when members leave
    active = lambda rates: rates if bool((rates > 0).any()) else None  # noqa: E731
    drop_p, attn_p = active(dropout), active(attn_dropout)
    smoothing = as_t([c.label_smoothing for c in cfgs])
    lr_table = as_t([[c.lr * lr_factor(s, warmup=c.warmup_steps, total=bud.steps) for s in range(bud.steps)]
                     for c in cfgs])  # (K, S)  # fmt: skip
    opt = MemberAdamW(model, as_t([c.weight_decay for c in cfgs]))
    rotary = rotary_tables(L, cfgs[0].d_model // cfgs[0].n_heads, device=dev)
    block_mask = member_block_mask(model.masks) if dev.type == "cuda" else None
    alive = list(range(K0))  # positions (into cfgs) of the members still training
    rungs = set(bud.rung_steps())
    curves: list[list[tuple[int, float]]] = [[] for _ in range(K0)]
    state: list[str] = [M.COMPLETE] * K0
    reason: list[str | None] = [None] * K0
    last_loss, steps_done = [math.nan] * K0, [0] * K0
    train_s = eval_s = 0.0

    def forward(xb: torch.Tensor) -> torch.Tensor:
        with _autocast(dev):
            return model(xb, dropout=drop_p, attn_dropout=attn_p, block_mask=block_mask, rotary=rotary,
                         generator=drop_gen)  # fmt: skip

    params = float(sum(p[0].numel() for p in model.parameters()))
    if bud.target_len is None:
        # latency: a forward pass of `latency_batch` sequences per member, measured once for the population
        model.eval()
        lat_x = x_eval[: bud.latency_batch].unsqueeze(0).expand(K0, -1, -1)
        with torch.no_grad():
            latency, spread = measure_latency(lambda: forward(lat_x), device=dev)
        model.train()
        compute = [{M.FLOPS: float(model_flops(c, seq_len=L, n_classes=the_task.n_classes)), M.PARAMS: params,
                    M.LATENCY_MS: latency / K0, M.LATENCY_SPREAD: spread} for c in cfgs]  # fmt: skip
    else:  # each member alone at the user's length (its own pattern's cost)
        compute = [{M.PARAMS: params, **measure_at_length(c, the_task, bud.target_len, device=dev,
                                                          batch=target_batch(bud, L))} for c in cfgs]  # fmt: skip
    state_mb = training_state_mb(models[0])
    memory_step = min(2, min(rungs))

    # Losses stay on the device between checks (a rung, the end, the time limit, every SYNC_EVERY
    # steps): reading them at every step made the host wait for the GPU at every step. What a check
    # needs is kept per member: the last loss, and the first step whose loss was not finite.
    last_dev = torch.full((K0,), math.nan, device=dev)
    bad_step = torch.zeros(K0, device=dev)  # 0: every loss so far finite
    bad_loss = torch.zeros(K0, device=dev)

    def drop(positions: list[int]) -> None:
        nonlocal dropout, attn_dropout, drop_p, attn_p, smoothing, block_mask, rows_table, lr_table
        nonlocal last_dev, bad_step, bad_loss
        keep = [j for j, k in enumerate(alive) if k not in positions]
        alive[:] = [alive[j] for j in keep]
        if not alive:
            return  # the population is done
        index = torch.tensor(keep, device=dev, dtype=torch.long)
        model.keep(index)
        opt.keep(index)
        dropout, attn_dropout, smoothing, rows_table, lr_table, last_dev, bad_step, bad_loss = (
            t.index_select(0, index)
            for t in (dropout, attn_dropout, smoothing, rows_table, lr_table, last_dev, bad_step, bad_loss)
        )
        drop_p, attn_p = active(dropout), active(attn_dropout)
        if block_mask is not None:
            block_mask = member_block_mask(model.masks)

    for step in range(1, bud.steps + 1):
        rows = rows_table[:, step - 1]  # (K, B)
        xb, yb = x_train[rows], y_train[rows]  # (K, B, L)
        lr = lr_table[:, step - 1]  # (K,)
        t0 = time.perf_counter()

        def train_step(xb: torch.Tensor = xb, yb: torch.Tensor = yb, lr: torch.Tensor = lr) -> torch.Tensor:
            losses = _member_loss(forward(xb), yb, smoothing)  # (K,)
            opt.zero_grad()
            losses.sum().backward()
            _clip_per_member(model)
            opt.step(lr)
            return losses.detach()

        if step == memory_step:
            losses, peak = peak_memory_mb(train_step, device=dev)
            for k in alive:
                if bud.target_len is None:  # (at a target length: each member's forward pass, measured above)
                    compute[k][M.PEAK_MEM_MB] = state_mb + (0.0 if math.isnan(peak) else peak / len(alive))
                if on_compute is not None:
                    on_compute(ids[k], dict(compute[k]))
        else:
            losses = train_step()
        train_s += (time.perf_counter() - t0) * 1.0
        first_bad = ~torch.isfinite(losses) & (bad_step == 0)
        bad_step = torch.where(first_bad, float(step), bad_step)
        bad_loss = torch.where(first_bad, losses, bad_loss)
        last_dev = losses
        out_of_time = bud.time_limit_s is not None and time.perf_counter() - wall_start > bud.time_limit_s
        if step in rungs or out_of_time or step == bud.steps or step % SYNC_EVERY == 0:
            values, bad_steps, bad_losses = torch.stack([last_dev, bad_step, bad_loss]).tolist()  # one sync
            diverged = []
            for j, k in enumerate(alive):
                last_loss[k], steps_done[k] = values[j], step
                if bad_steps[j] > 0:
                    at = int(bad_steps[j])
                    last_loss[k], steps_done[k] = bad_losses[j], at
                    state[k], reason[k] = M.FAILED, f"non-finite training loss ({bad_losses[j]}) at step {at}"
                    diverged.append(k)
            if diverged:
                drop(diverged)
            if not alive:
                break
        if step in rungs or out_of_time:
            t0 = time.perf_counter()
            accs = _accuracies(forward, model, x_eval, y_eval, len(alive))
            eval_s += time.perf_counter() - t0
            for j, k in enumerate(alive):
                curves[k].append((step, accs[j]))
            if report_rungs is None:
                stopped = []
            else:
                stops = report_rungs(step, [(ids[k], accs[j]) for j, k in enumerate(alive)])
                stopped = [k for k, stop in zip(alive, stops, strict=True) if stop]
            for k in stopped:
                state[k], reason[k] = M.PRUNED, f"stopped by the reporter at step {step}"
            if stopped:
                drop(stopped)
            if not alive:
                break
        if out_of_time:
            for k in alive:
                reason[k] = f"time limit of {bud.time_limit_s}s reached at step {step}"
            break

    wall = time.perf_counter() - wall_start
    results = []
    for k, c in enumerate(cfgs):
        compute[k].setdefault(M.PEAK_MEM_MB, state_mb)
        metrics = {
            M.ACCURACY: curves[k][-1][1] if curves[k] else math.nan,
            **compute[k],
            M.TRAIN_SECONDS: train_s / K0,
            M.EVAL_SECONDS: eval_s / K0,
            M.MEASURE_SECONDS: 0.0,
            M.FINAL_LOSS: last_loss[k],
            M.STEPS: float(steps_done[k]),
            M.WALL_SECONDS: wall / K0,
        }
        results.append(TrialResult(config=c, metrics=metrics, curve=curves[k], state=state[k], reason=reason[k],
                                   device=str(dev), task=the_task.name))  # fmt: skip
    return results


@torch.no_grad()
def _accuracies(forward: Callable[[torch.Tensor], torch.Tensor], model: PopulationModel, x: torch.Tensor,
                y: torch.Tensor, K: int, batch: int = 256) -> list[float]:  # fmt: skip
    """Each member's fraction of scored eval positions predicted right."""
    model.eval()
    right = torch.zeros(K, device=x.device)
    total = torch.zeros(K, device=x.device)
    for i in range(0, len(x), batch):
        xb, yb = x[i : i + batch], y[i : i + batch]
        pred = forward(xb.unsqueeze(0).expand(K, -1, -1)).argmax(-1)  # (K, b, L)
        scored = (yb != IGNORE).unsqueeze(0)  # (1, b, L)
        right += ((pred == yb.unsqueeze(0)) & scored).flatten(1).sum(1)
        total += scored.flatten(1).sum(1)
    model.train()
    return (right / total.clamp(min=1)).tolist()
