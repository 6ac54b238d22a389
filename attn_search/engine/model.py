"""The small attention model a trial trains: a pre-LayerNorm transformer with pattern-sparse
self-attention and a per-position classification head (nanoGPT's layout), written once with a
*member axis*: one module holds ``K`` configurations that share a shape (``d_model``, ``n_layers``)
and trains them as one model (HFTA's fused ops, Wang et al. MLSys 2021): what a population trains.
A lone trial trains the plain model instead (:mod:`attn_search.engine.single`), with this model's
initial weights, unless a kernel is forced (``kernel`` other than ``auto``) or the grouped member
layout is asked for: then ``K = 1`` here.

* Every parameter is stacked on a leading member axis (``Linear.weight`` is ``(K, in, out)``) and
  every layer is one batched op for all members (``baddbmm``); shape comments carry the member
  axis, ``# (K, B, L, C)``.
* What differs between members lives in per-member tables and is applied in the same ops: the
  dropout rates, the attention pattern (a row of a ``(K, L, L)`` mask table, which FlexAttention's
  ``mask_mod`` reads with the batch index as the member), and the head count: members are grouped
  by it, and each group attends at its own head shape (``d_model / n_heads`` channels, its own
  ``1/sqrt(head_dim)`` scale and rotary frequencies), so no member carries channels it does not
  have. How several members attend is the *member layout* the trainer chooses
  (``member_layout``, :mod:`attn_search.engine.member_layout`): each member on its own path on the
  CPU, the grouped layout on CUDA.
* ``init_member(k, seed)`` and ``set_member(k, config)`` give slot ``k`` a new configuration and
  fresh weights from its own seed, so a member's weights are those of its one-by-one trial and a
  slot can be refilled while the others train on (the trainer's continuous batching).
* With ``K = 1`` (a forced kernel, a population shrunk to one) attention takes the single-pattern
  paths of :func:`~attn_search.engine.attention.attention_plan` (the block-sparse kernel on CPU,
  FlexAttention on CUDA); the plain model (:mod:`attn_search.engine.plain`) computes the same
  function, checked against this one in tests.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from attn_search.engine.attention import dropout_mask
from attn_search.engine.config import AttentionConfig
from attn_search.engine.member_layout import LAYOUTS, MemberPlan, head_groups, single_paths
from attn_search.engine.plain import rotate as apply_rotary
from attn_search.engine.tasks import Task

Members = AttentionConfig | Sequence[AttentionConfig]
"""One configuration, or the ``K`` configurations of a population (one per slot)."""


def _members(configs: Members) -> list[AttentionConfig]:
    members = [configs] if isinstance(configs, AttentionConfig) else list(configs)
    assert members, "a model needs at least one member"
    return members


def _per_member(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` ``(K,)`` viewed to broadcast against ``like`` ``(K, ...)``."""
    return t.view(-1, *([1] * (like.dim() - 1)))


class Linear(nn.Module):
    """``K`` linear layers as one op: ``(K, ..., in) -> (K, ..., out)``; weight ``(K, in, out)``."""

    def __init__(self, K: int, d_in: int, d_out: int, *, std: float = 0.02) -> None:
        super().__init__()
        self.std = std  # initial weights: normal(0, std), biases 0 (a model redraws them per member: init_member)
        self.weight = nn.Parameter(torch.empty(K, d_in, d_out).normal_(0.0, std))
        self.bias = nn.Parameter(torch.zeros(K, d_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        K = x.shape[0]
        y = torch.baddbmm(self.bias.unsqueeze(1), x.reshape(K, -1, x.shape[-1]), self.weight)  # (K, N, out)
        return y.view(*x.shape[:-1], -1)


class LayerNorm(nn.Module):
    """``K`` LayerNorms over the last dimension; weight and bias ``(K, C)``."""

    def __init__(self, K: int, C: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(K, C))
        self.bias = nn.Parameter(torch.zeros(K, C))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (K, ..., C)
        C = x.shape[-1]
        if x.shape[0] == 1:  # one member: the fused affine kernel
            return F.layer_norm(x, (C,), self.weight[0], self.bias[0])
        shape = (x.shape[0], *([1] * (x.dim() - 2)), C)
        return torch.addcmul(self.bias.view(shape), F.layer_norm(x, (C,)), self.weight.view(shape))


class Embedding(nn.Module):
    """``K`` embedding tables ``(K, V, C)``: ids ``(K, B, L)`` -> ``(K, B, L, C)``."""

    def __init__(self, K: int, V: int, C: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(K, V, C).normal_(0.0, 0.02))
        self.offset: torch.Tensor
        self.register_buffer("offset", (torch.arange(K) * V).view(K, 1, 1), persistent=False)  # member k's rows

    def keep_members(self, slots: list[int]) -> None:
        """(The weights are the optimiser's to re-index.)"""
        self.offset = (torch.arange(len(slots), device=self.offset.device) * self.weight.shape[1]).view(-1, 1, 1)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        K, V, C = self.weight.shape
        if K == 1:
            return F.embedding(idx, self.weight[0])
        return F.embedding(idx + self.offset, self.weight.reshape(K * V, C))


class Dropout(nn.Module):
    """Inverted dropout with each member's own rate, a uniform-threshold mask
    (:func:`attn_search.engine.attention.dropout_mask`): the same function as ``nn.Dropout``,
    several times cheaper on CPU. Whether any member drops is known on the host (no device read)."""

    def __init__(self, rates: Sequence[float]) -> None:
        super().__init__()
        self.rates = [float(r) for r in rates]
        self.p: torch.Tensor
        self.register_buffer("p", torch.tensor(self.rates), persistent=False)  # (K,)

    def set_member(self, k: int, rate: float) -> None:
        self.rates[k] = float(rate)
        with torch.no_grad():
            self.p[k] = float(rate)

    def keep_members(self, slots: list[int]) -> None:
        self.rates = [self.rates[k] for k in slots]
        self.p = self.p[slots]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (K, ...)
        if not self.training or not any(self.rates):
            return x
        if len(self.rates) == 1:
            p = self.rates[0]
            return x * dropout_mask(x, p) * (1.0 / (1.0 - p))
        keep = torch.rand_like(x) >= _per_member(self.p, x)
        return x * keep / _per_member(1.0 - self.p, x).to(x.dtype)


class SparseSelfAttention(nn.Module):
    """Multi-head self-attention restricted to each member's pattern. Input/output ``(K, B, L, d_model)``,
    or ``(B, L, d_model)`` for one member (a drop-in layer).

    Positions enter through rotary embeddings on queries and keys: relative offsets are what a
    sparse pattern is about, and they let a head learn "attend to the previous token" in a few
    steps, which associative recall needs (an induction circuit)."""

    def __init__(self, configs: Members, *, kernel: str = "auto", heads: tuple[int, int] | None = None,
                 member_layout: str = "auto") -> None:  # fmt: skip
        super().__init__()
        if member_layout not in LAYOUTS:
            raise ValueError(f"member_layout={member_layout!r} is unknown: use one of {', '.join(LAYOUTS)}")
        self.member_layout = member_layout  # how several members attend (attn_search.engine.member_layout)
        self.members = _members(configs)
        for c in self.members:
            assert c.d_model % c.n_heads == 0, f"n_heads={c.n_heads} must divide d_model={c.d_model}"
            assert c.head_dim % 2 == 0, f"head_dim={c.head_dim} must be even for rotary embeddings"
        K, C = len(self.members), self.members[0].d_model
        self.kernel = kernel
        self.qkv = Linear(K, C, 3 * C)
        self.proj = Linear(K, C, C, std=0.02 / math.sqrt(2 * self.members[0].n_layers))  # GPT-2's scaled init
        self.resid_drop = Dropout([c.dropout for c in self.members])
        # members' head groups (:class:`MemberPlan`): they start at the head counts refills may
        # bring (``heads``: the space's range) and only grow, so refills keep the shapes and
        # FlexAttention's kernels
        self.layout: tuple[int, ...] = () if heads is None else head_groups(C, heads)
        # per (length, device, mode): what attention needs, built on first use so that a training
        # step resolves, looks up and builds nothing
        self._plans: dict[tuple[Any, ...], Any] = {}
        self.plans_dropped = 0  # counts plans dropped (their tensors gone): a captured step is stale

    @property
    def pattern(self) -> str:
        """The first member's pattern (a single layer's)."""
        return self.members[0].pattern

    @property
    def params(self) -> dict[str, int]:
        """The first member's pattern parameters."""
        return dict(self.members[0].pattern_params())

    def set_member(self, k: int, config: AttentionConfig) -> None:
        """Refill slot ``k``: each member plan is updated in place (its tensors keep their storage),
        and only a plan that cannot hold ``config`` is dropped and rebuilt on next use."""
        self.members[k] = config
        for key, plan in list(self._plans.items()):
            if not (isinstance(plan, MemberPlan) and plan.set_member(k, config)):
                self.drop_plans(key)

    def keep_members(self, slots: list[int]) -> None:
        self.members = [self.members[k] for k in slots]
        self.drop_plans()

    def drop_plans(self, key: tuple[Any, ...] | None = None) -> None:
        """Drop the plan of ``key`` (every plan: ``None``); it is rebuilt on next use."""
        for k in [key] if key is not None else list(self._plans):
            del self._plans[k]
            self.plans_dropped += 1

    def _plan(self, L: int, device: torch.device) -> Any:
        key = (L, device, self.training, torch.is_grad_enabled())
        plan = self._plans.get(key)
        if plan is not None:
            return plan
        if len(self.members) > 1:
            C = self.members[0].d_model
            self.layout = tuple(sorted({*self.layout, *head_groups(C, [c.n_heads for c in self.members])}))
            plan = MemberPlan(self.members, L, device, kernel=self.kernel, layout=self.member_layout,
                              dropout=self.training and torch.is_grad_enabled(), heads=self.layout)  # fmt: skip
        else:
            # (PyTorch has no CPU backward for flex: a population shrunk to one member trains on auto's path)
            cpu_training = device.type == "cpu" and torch.is_grad_enabled()
            kernel = "auto" if cpu_training and self.kernel == "flex" else self.kernel
            plan = single_paths(self.members, L, device, kernel=kernel, dropout=self.training,
                                training=torch.is_grad_enabled())  # fmt: skip
        self._plans[key] = plan
        return plan

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:  # (B, L, C): one member
            return self.forward(x.unsqueeze(0))[0]
        K, B, L, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=-1)  # 3 x (K, B, L, C)
        plan = self._plan(L, x.device)
        alone = plan if isinstance(plan, list) else plan.alone
        if alone is not None:  # each member on its own single-pattern path (a trial; the CPU's members)
            ys = []
            for m, (attend, cos, sin) in enumerate(alone):
                h = self.members[m].n_heads
                qm, km, vm = (t[m].view(B, L, h, C // h).transpose(1, 2) for t in (q, k, v))  # (B, h, L, d)
                qm, km = apply_rotary(qm, cos, sin), apply_rotary(km, cos, sin)
                ys.append(attend(qm, km, vm).transpose(1, 2).reshape(B, L, C))
            y = ys[0].unsqueeze(0) if K == 1 else torch.stack(ys)  # (K, B, L, C)
        else:
            y = plan.attend(q, k, v)  # (K, B, L, C)
        return self.resid_drop(self.proj(y))


class Block(nn.Module):
    def __init__(self, configs: Members, *, kernel: str = "auto", heads: tuple[int, int] | None = None,
                 member_layout: str = "auto") -> None:  # fmt: skip
        super().__init__()
        members = _members(configs)
        K, C = len(members), members[0].d_model
        self.ln1 = LayerNorm(K, C)
        self.attn = SparseSelfAttention(members, kernel=kernel, heads=heads, member_layout=member_layout)
        self.ln2 = LayerNorm(K, C)
        self.fc = Linear(K, C, 4 * C)
        self.out = Linear(K, 4 * C, C, std=0.02 / math.sqrt(2 * members[0].n_layers))  # GPT-2's scaled init
        self.mlp_drop = Dropout([c.dropout for c in members])

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (K, B, L, C)
        x = x + self.attn(self.ln1(x))
        return x + self.mlp_drop(self.out(F.gelu(self.fc(self.ln2(x)))))


class AttentionModel(nn.Module):
    """Token (+ previous-token) embeddings, ``n_layers`` blocks (rotary positions), final
    LayerNorm, linear head; ``K`` members of one shape.

    ``forward(idx)`` maps token ids ``(K, B, L)`` to logits ``(K, B, L, n_classes)``, or ``(B, L)``
    to ``(B, L, n_classes)`` for a model of one member.
    """

    member_axis = True  # every parameter is stacked on a leading member axis

    def __init__(
        self,
        configs: Members,
        *,
        vocab_size: int,
        n_classes: int,
        max_len: int,
        kernel: str = "auto",
        heads: tuple[int, int] | None = None,
        member_layout: str = "auto",
    ) -> None:
        super().__init__()
        members = _members(configs)
        first = members[0]
        for c in members[1:]:
            assert shape_key(c) == shape_key(first), f"members must share a shape: {shape_key(c)} != {shape_key(first)}"
        self.members = members
        self.max_len = max_len
        K, C = len(members), first.d_model
        self.tok_emb = Embedding(K, vocab_size, C)
        # Token shift: each position also sees the previous token's (separate) embedding, the
        # simplest of the short causal mixers of modern attention hybrids (RWKV's token shift;
        # Based/Zoology, arXiv:2312.04927, show it is what lets small attention models do
        # associative recall without first growing an induction circuit). Recall accuracy then
        # measures how far attention reaches, which is what a sparsity search trades.
        self.prev_emb = Embedding(K, vocab_size, C)
        self.drop = Dropout([c.dropout for c in members])
        self.blocks = nn.ModuleList(
            [Block(members, kernel=kernel, heads=heads, member_layout=member_layout) for _ in range(first.n_layers)]
        )
        self.ln_f = LayerNorm(K, C)
        self.head = Linear(K, C, n_classes)
        for k, c in enumerate(members):
            self.init_member(k, c.seed)

    @property
    def config(self) -> AttentionConfig:
        """The first member's configuration (the only one of a single trial's model)."""
        return self.members[0]

    @torch.no_grad()
    def init_member(self, k: int, seed: int) -> None:
        """Fresh weights for slot ``k`` from ``seed`` alone (whatever the other members are): linear
        and embedding weights normal(0, 0.02), residual projections GPT-2's 0.02/sqrt(2 n_layers),
        biases 0, LayerNorms 1 and 0. Drawn on the CPU, so a seed gives the same weights on any device."""
        gen = torch.Generator().manual_seed(seed)
        for module in self.modules():
            if isinstance(module, Linear | Embedding):
                std = module.std if isinstance(module, Linear) else 0.02
                w = module.weight
                w[k].copy_(torch.empty(w.shape[1:]).normal_(0.0, std, generator=gen))
                if isinstance(module, Linear):
                    module.bias[k].zero_()
            elif isinstance(module, LayerNorm):
                module.weight[k].fill_(1.0)
                module.bias[k].zero_()

    def keep_members(self, slots: list[int]) -> None:
        """Keep only the members in ``slots`` (in that order): every per-member table and list.
        Parameters are re-indexed where they live (``MemberAdamW.keep``: the flat buffer they view)."""
        self.members = [self.members[k] for k in slots]
        for module in self.modules():
            if isinstance(module, Dropout | Embedding | SparseSelfAttention):
                module.keep_members(slots)

    def set_member(self, k: int, config: AttentionConfig) -> None:
        """Put ``config`` in slot ``k`` with its fresh weights (a refilled slot)."""
        assert shape_key(config) == shape_key(self.members[0]), "a refill must share the population's shape"
        self.members[k] = config
        for module in self.modules():  # every per-member rate and list
            if isinstance(module, Dropout):
                module.set_member(k, config.dropout)
            elif isinstance(module, SparseSelfAttention):
                module.set_member(k, config)
        self.init_member(k, config.seed)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if idx.dim() == 2:  # (B, L): one member
            return self.forward(idx.unsqueeze(0))[0]
        K, B, L = idx.shape
        assert self.max_len >= L, f"sequence length {L} exceeds the model's max_len={self.max_len}"
        prev = F.pad(idx[..., :-1], (1, 0))  # (K, B, L): token at t-1, 0 at t=0
        x = self.drop(self.tok_emb(idx) + self.prev_emb(prev))  # (K, B, L, C)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))  # (K, B, L, n_classes)

    def set_kernel(self, kernel: str) -> None:
        """Switch every attention layer's kernel (``auto``, ``reference``, ``blocked``, ``flex``)."""
        for block in self.blocks:
            assert isinstance(block, Block)
            block.attn.kernel = kernel
            block.attn.drop_plans()

    def plans_dropped(self) -> int:
        """Attention plans dropped so far (refills a plan could not hold, shrinks, kernel
        switches): while it stays the same, every tensor a training step reads keeps its storage."""
        total = 0
        for block in self.blocks:
            assert isinstance(block, Block)
            total += block.attn.plans_dropped
        return total


def shape_key(config: AttentionConfig) -> tuple[Any, ...]:
    """What the members of one model must share; everything else (head count, pattern, rates,
    learning rate, seed) can differ between them."""
    return (config.d_model, config.n_layers, config.batch_size, config.causal)


def build_model(
    configs: Members,
    task: Task,
    *,
    kernel: str = "auto",
    heads: tuple[int, int] | None = None,
    member_layout: str = "auto",
) -> AttentionModel:
    """The model ``configs`` describe (one configuration, or a population's), sized for ``task``
    (vocabulary, classes, sequence length); each member's weights come from its own seed.
    ``heads``: the (min, max) head counts refills may bring, which sets a population's head groups
    from the start (see :class:`SparseSelfAttention`). ``member_layout``: how several members
    attend (:mod:`attn_search.engine.member_layout`; ``grouped`` forces CUDA's layout on the CPU)."""
    return AttentionModel(
        configs,
        vocab_size=task.vocab_size,
        n_classes=task.n_classes,
        max_len=task.seq_len,
        kernel=kernel,
        heads=heads,
        member_layout=member_layout,
    )


def count_params(model: nn.Module) -> int:
    """Trainable parameters of one member (of a model with a member axis, or of a plain one)."""
    stacked = getattr(model, "member_axis", True)  # (a member model's submodules are stacked too)
    return sum(p[0].numel() if stacked else p.numel() for p in model.parameters() if p.requires_grad)


def loss_fn(logits: torch.Tensor, y: torch.Tensor, *, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy over scored positions (targets ``-100`` are ignored), one member's."""
    return F.cross_entropy(
        logits.flatten(0, -2).float(), y.flatten(), ignore_index=-100, label_smoothing=label_smoothing
    )


def member_losses(logits: torch.Tensor, y: torch.Tensor, smoothing: torch.Tensor | float) -> torch.Tensor:
    """Each member's cross-entropy over its scored positions (targets ``-100`` ignored), with its
    own label smoothing (``(K,)``, or a float for one member): logits ``(K, B, L, n)``, targets
    ``(K, B, L)`` -> ``(K,)``."""
    if not isinstance(smoothing, torch.Tensor):  # one member: the fused kernel
        return loss_fn(logits, y, label_smoothing=smoothing).unsqueeze(0)
    logp = torch.log_softmax(logits.float(), dim=-1)  # (K, B, L, n)
    scored = y != -100  # (K, B, L)
    nll = -logp.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (K, B, L)
    eps = smoothing.view(-1, 1, 1)
    per = ((1 - eps) * nll - eps * logp.mean(-1)) * scored
    return per.flatten(1).sum(1) / scored.flatten(1).sum(1).clamp(min=1)
