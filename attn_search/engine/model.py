"""The small attention model a trial trains: a pre-LayerNorm transformer with pattern-sparse
self-attention and a per-position classification head (nanoGPT's layout), written once with a
*member axis*: one module holds ``K`` configurations that share a shape (``d_model``, ``n_layers``)
and trains them as one model (HFTA's fused ops, Wang et al. MLSys 2021). A single trial is a
population of one (``K = 1``).

* Every parameter is stacked on a leading member axis (``Linear.weight`` is ``(K, in, out)``) and
  every layer is one batched op for all members (``baddbmm``); shape comments carry the member
  axis, ``# (K, B, L, C)``.
* What differs between members lives in per-member tables and is applied in the same ops: the
  dropout rates, the attention pattern (a row of a ``(K, L, L)`` mask table, which FlexAttention's
  ``mask_mod`` reads with the batch index as the member), and the head count: members are grouped
  by it, and each group attends at its own head shape (``d_model / n_heads`` channels, its own
  ``1/sqrt(head_dim)`` scale and rotary frequencies), so no member carries channels it does not
  have (see :class:`_MemberPlan`).
* ``init_member(k, seed)`` and ``set_member(k, config)`` give slot ``k`` a new configuration and
  fresh weights from its own seed, so a member's weights are those of its one-by-one trial and a
  slot can be refilled while the others train on (the trainer's continuous batching).
* With ``K = 1`` attention takes the single-pattern paths of :func:`~attn_search.engine.attention.attention_plan`
  (the block-sparse kernel on CPU, FlexAttention on CUDA), the paths the exported layer runs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from attn_search.engine.attention import (
    Attend,
    _cached_mask,
    _flex,
    _key,
    attention_plan,
    dropkey_mask,
    dropkey_score_mod,
    dropout_mask,
    member_block_mask,
)
from attn_search.engine.config import AttentionConfig
from attn_search.engine.patterns import pattern_mask, resolve_params
from attn_search.engine.plain import rotary as rotary_tables
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


CPU_PER_MEMBER = True
"""On the CPU each member attends on its own single-pattern path (``False``: the grouped layout CUDA
runs, which tests use to check that layout on the CPU)."""


Alone = list[tuple[Attend, torch.Tensor, torch.Tensor]]
"""Per member: its own single-pattern ``attend(q, k, v)`` and rotary cos/sin tables."""


def _alone(members: list[AttentionConfig], L: int, device: torch.device, *, backend: str, dropout: bool,
           training: bool) -> Alone:  # fmt: skip
    """Each member's single-pattern attention plan (:func:`attention_plan`), the path its trial
    alone takes, with its rotary tables."""
    return [(attention_plan(c.pattern, L, causal=c.causal, backend=backend, device=device,
                            dropout_p=c.attn_dropout if dropout else 0.0, training=training, **c.pattern_params()),
             *rotary_tables(L, c.head_dim, device=device)) for c in members]  # fmt: skip


_BLOCK_MASK_TENSORS = (
    "kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
    "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices",
)  # fmt: skip
"""A BlockMask's tensors: a refill copies its member's new blocks into them."""


def head_groups(C: int, heads: Sequence[int]) -> tuple[int, ...]:
    """The head counts of a population's grouped layout that ``heads`` (the members' and, where
    known, the range ``(lo, hi)`` of the space's) call for: every count in that range that splits
    ``d_model`` into even head dims (rotary pairs)."""
    lo, hi = min(heads), max(heads)
    return tuple(h for h in range(lo, hi + 1) if C % h == 0 and (C // h) % 2 == 0)


class _MemberPlan:
    """What attention over several members needs, built once per (length, device, mode): the
    *grouped* head layout, the mask table, the BlockMasks (CUDA) and the attention-dropout rates.

    Members are grouped by head count: group ``h`` runs attention at its own shape ``(K, B*h, L,
    d_model/h)``, so no member carries a channel or head it does not have (a layout padded to
    ``max heads x widest head`` moved 4x the channels of a 2-, 4- and 8-head mix). On FlexAttention
    every group's kernel sees all ``K`` members with a BlockMask in which the other groups' members
    have no blocks (the kernel skips them), so shapes stay fixed whoever is refilled into a slot:
    one compiled kernel per head count, and a refill only rewrites table rows in place. The dense
    path (the CPU) gathers each group's members instead, since a fully masked row there is NaN."""

    def __init__(self, members: list[AttentionConfig], L: int, device: torch.device, *, backend: str,
                 dropout: bool, heads: tuple[int, ...]) -> None:  # fmt: skip
        # FlexAttention on CUDA; on the CPU only where asked for and without gradients (PyTorch has
        # no CPU backward for it): evaluation passes
        rates = [c.attn_dropout for c in members]
        # (attention dropout is DropKey inside the kernel: it does not turn the fused path off)
        use_flex = ((device.type == "cuda" and backend == "auto") or backend == "flex") and not (
            device.type == "cpu" and dropout
        )
        # On the CPU arithmetic, not launches, bounds a step: each member attends on the path its
        # own trial takes (the block-sparse kernel skips masked tiles and drops attention inside
        # them; no materialised scores). Where shapes must stay fixed (CUDA) the grouped layout
        # serves all.
        self.alone: Alone | None = None
        self.L, self.device, self.dropout = L, device, dropout
        self.backend_alone = "auto" if backend == "flex" else backend  # (no CPU backward for flex)
        self.block_masks: list[Any] | None = None
        self.score_mod: Any = None
        if device.type == "cpu" and not use_flex and CPU_PER_MEMBER:
            self.alone = _alone(members, L, device, backend=self.backend_alone, dropout=dropout, training=dropout)
            return
        C, K = members[0].d_model, len(members)
        self.heads = heads  # one group per head count, in this order
        self.scales = [1.0 / math.sqrt(C // h) for h in heads]
        # rotary positions for every member at once, in its own head layout (one rotation of the
        # (K, B, L, C) projections, not one per group): channel c of a head of d channels pairs
        # with c +- d/2, ``x * cos + x[partner] * sin`` with the sign folded into ``sin``
        self.cos = torch.empty(K, 1, L, C, device=device)
        self.sin = torch.empty(K, 1, L, C, device=device)
        self.partner = torch.empty(K, 1, 1, C, dtype=torch.long, device=device)
        self.masks = torch.empty(K, L, L, dtype=torch.bool, device=device)
        self.member = torch.zeros(len(heads), K, dtype=torch.bool, device=device)  # (G, K): k is in group g
        self.rows: list[list[int]] = [[] for _ in heads]  # the same, as index lists (the dense path)
        for k, c in enumerate(members):
            self._fill(k, c)
        self.attn_p = torch.tensor(rates, device=device) if dropout and any(rates) else None
        if use_flex:
            self.block_masks = self._block_masks()
            if self.attn_p is not None:
                self.seed = torch.randint(0, 2**31 - 1, (), device=device)  # advanced in place each step
                self.score_mod = dropkey_score_mod(self.attn_p, self.seed, per_batch=True)

    def _block_masks(self) -> list[Any]:
        """One BlockMask per group: the members' mask rows, with no blocks for other groups' members."""
        return [member_block_mask(self.masks, members=self.member[g]) for g in range(len(self.heads))]

    def _fill(self, k: int, c: AttentionConfig) -> None:
        """Slot ``k``'s rows of every table, written in place."""
        key = _key(c.pattern, self.L, c.causal, resolve_params(c.pattern, **c.pattern_params()))
        self.masks[k].copy_(_cached_mask(key, str(self.device)))
        h, d = c.n_heads, c.d_model // c.n_heads
        cos, sin = rotary_tables(self.L, d, device=self.device)  # (L, d/2)
        self.cos[k, 0].copy_(torch.cat([cos, cos], dim=-1).repeat(1, h))
        self.sin[k, 0].copy_(torch.cat([-sin, sin], dim=-1).repeat(1, h))
        j = torch.arange(c.d_model, device=self.device)
        self.partner[k].copy_((j - j % d + (j % d + d // 2) % d).view(1, 1, -1))
        g = self.heads.index(c.n_heads)
        self.member[:, k] = False
        self.member[g, k] = True
        for rows in self.rows:
            if k in rows:
                rows.remove(k)
        self.rows[g] = sorted([*self.rows[g], k])

    def set_member(self, k: int, c: AttentionConfig) -> bool:
        """Refill slot ``k`` in place, so every tensor keeps its storage (``data_ptr``) and a
        captured step or compiled kernel stays valid. ``False`` where the plan cannot hold ``c``
        (a head count outside its groups, attention dropout where none was planned): the caller
        rebuilds it."""
        if self.alone is not None:
            self.alone[k] = _alone([c], self.L, self.device, backend=self.backend_alone, dropout=self.dropout,
                                   training=self.dropout)[0]  # fmt: skip
            return True
        if c.n_heads not in self.heads:
            return False
        if self.dropout and c.attn_dropout > 0 and self.attn_p is None:
            return False
        self._fill(k, c)
        if self.attn_p is not None:
            self.attn_p[k] = c.attn_dropout if self.dropout else 0.0
        if self.block_masks is not None:  # the new pattern's blocks, copied into the same tensors
            for old_mask, fresh in zip(self.block_masks, self._block_masks(), strict=True):
                for name in _BLOCK_MASK_TENSORS:
                    old, new = getattr(old_mask, name), getattr(fresh, name)
                    if old is not None:
                        old.copy_(new)
        return True

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """Rotary positions of ``(K, B, L, C)`` projections, each member in its own head layout
        (what :func:`apply_rotary` does per head)."""
        partner = x.gather(-1, self.partner.expand_as(x))
        return x * self.cos.to(x.dtype) + partner * self.sin.to(x.dtype)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention of ``(K, B, L, C)`` projections (before rotary) -> ``(K, B, L, C)``: each member
        in its group's head layout, with its pattern (row ``member`` of the table) and DropKey rate."""
        K, B, L, C = q.shape
        q, k = self.rotate(q), self.rotate(k)
        y = torch.zeros_like(q)
        if self.score_mod is not None:
            self.seed.add_(1)
        for g, h in enumerate(self.heads):
            if self.block_masks is None:  # dense path: this group's members gathered
                if not self.rows[g]:
                    continue
                idx = torch.tensor(self.rows[g], device=q.device)
                qg, kg, vg = (_heads(t.index_select(0, idx), h) for t in (q, k, v))  # (Kg, B*h, L, d)
                p = None if self.attn_p is None else self.attn_p.index_select(0, idx)
                o = _rows_attend(qg, kg, vg, self.masks.index_select(0, idx), p, scale=self.scales[g])
                y = y.index_copy(0, idx, _merge_heads(o, B, h))
            else:  # every group's kernel runs on all K (fixed shapes); other groups' members have no blocks
                qg, kg, vg = (_heads(t, h) for t in (q, k, v))  # (K, B*h, L, d)
                o = _flex(qg, kg, vg, self.block_masks[g], scale=self.scales[g], score_mod=self.score_mod)
                y = torch.where(self.member[g].view(K, 1, 1, 1), _merge_heads(o, B, h), y)
        return y


def _heads(t: torch.Tensor, h: int) -> torch.Tensor:
    """``(K, B, L, C)`` -> ``(K, B*h, L, C/h)``."""
    K, B, L, C = t.shape
    return t.view(K, B, L, h, C // h).permute(0, 1, 3, 2, 4).reshape(K, B * h, L, C // h)


def _merge_heads(t: torch.Tensor, B: int, h: int) -> torch.Tensor:
    """Inverse of :func:`_heads`."""
    K, _, L, d = t.shape
    return t.view(K, B, h, L, d).permute(0, 1, 3, 2, 4).reshape(K, B, L, h * d)


def _rows_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, masks: torch.Tensor, attn_p: torch.Tensor | None,
                 scale: float | None = None) -> torch.Tensor:  # fmt: skip
    """Attention of ``(K, BH, L, D)`` inputs where member ``k`` sees row ``k`` of ``masks`` ``(K, L, L)``
    and drops keys (DropKey) with rate ``attn_p[k]`` (``None``: no member drops). The dense path of
    the grouped layout where FlexAttention cannot run (the CPU): its masks are materialised."""
    if attn_p is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=masks[:, None], scale=scale)  # mask (K, 1, L, L)
    K, BH, L, _ = q.shape
    keep = masks[:, None] & dropkey_mask((K, BH, L, L), attn_p, device=q.device)  # (K, BH, L, L)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=scale)


class SparseSelfAttention(nn.Module):
    """Multi-head self-attention restricted to each member's pattern. Input/output ``(K, B, L, d_model)``,
    or ``(B, L, d_model)`` for one member (a drop-in layer).

    Positions enter through rotary embeddings on queries and keys: relative offsets are what a
    sparse pattern is about, and they let a head learn "attend to the previous token" in a few
    steps, which associative recall needs (an induction circuit)."""

    def __init__(self, configs: Members, *, backend: str = "auto", heads: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.members = _members(configs)
        for c in self.members:
            assert c.d_model % c.n_heads == 0, f"n_heads={c.n_heads} must divide d_model={c.d_model}"
            assert c.head_dim % 2 == 0, f"head_dim={c.head_dim} must be even for rotary embeddings"
        K, C = len(self.members), self.members[0].d_model
        self.backend = backend
        self.qkv = Linear(K, C, 3 * C)
        self.proj = Linear(K, C, C, std=0.02 / math.sqrt(2 * self.members[0].n_layers))  # GPT-2's scaled init
        self.resid_drop = Dropout([c.dropout for c in self.members])
        # members' head groups (:class:`_MemberPlan`): they start at the head counts refills may
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
            if not (isinstance(plan, _MemberPlan) and plan.set_member(k, config)):
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
            plan = _MemberPlan(self.members, L, device, backend=self.backend,
                               dropout=self.training and torch.is_grad_enabled(), heads=self.layout)  # fmt: skip
        else:
            # (PyTorch has no CPU backward for flex: a population shrunk to one member trains on auto's path)
            cpu_training = device.type == "cpu" and torch.is_grad_enabled()
            backend = "auto" if cpu_training and self.backend == "flex" else self.backend
            plan = _alone(self.members, L, device, backend=backend, dropout=self.training,
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
    def __init__(self, configs: Members, *, backend: str = "auto", heads: tuple[int, int] | None = None) -> None:
        super().__init__()
        members = _members(configs)
        K, C = len(members), members[0].d_model
        self.ln1 = LayerNorm(K, C)
        self.attn = SparseSelfAttention(members, backend=backend, heads=heads)
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

    def __init__(
        self,
        configs: Members,
        *,
        vocab_size: int,
        n_classes: int,
        max_len: int,
        backend: str = "auto",
        heads: tuple[int, int] | None = None,
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
        self.blocks = nn.ModuleList([Block(members, backend=backend, heads=heads) for _ in range(first.n_layers)])
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

    def set_backend(self, backend: str) -> None:
        """Switch every attention layer's backend (``auto``, ``reference``, ``blocked``, ``flex``)."""
        for block in self.blocks:
            assert isinstance(block, Block)
            block.attn.backend = backend
            block.attn.drop_plans()

    def plans_dropped(self) -> int:
        """Attention plans dropped so far (refills a plan could not hold, shrinks, backend
        switches): while it stays the same, every tensor a training step reads keeps its storage."""
        total = 0
        for block in self.blocks:
            assert isinstance(block, Block)
            total += block.attn.plans_dropped
        return total


@torch.no_grad()
def attention_probs(model: AttentionModel, idx: torch.Tensor) -> torch.Tensor:
    """What each head of a one-member model's first layer attends on the sequence ``idx`` ``(L,)``:
    its attention probabilities ``(n_heads, L, L)`` (row: query, column: key; zero outside the
    pattern), computed as the layer computes them (rotary positions, the pattern's mask)."""
    c = model.members[0]
    assert len(model.members) == 1, "attention_probs reads a model of one member"
    L, C, H = idx.shape[-1], c.d_model, c.n_heads
    x = idx.view(1, 1, L)
    prev = F.pad(x[..., :-1], (1, 0))
    block = model.blocks[0]
    assert isinstance(block, Block)
    h = block.ln1(model.tok_emb(x) + model.prev_emb(prev))  # (1, 1, L, C)
    q, k, _ = block.attn.qkv(h)[0, 0].split(C, dim=-1)  # (L, C) each
    q, k = (t.view(L, H, C // H).transpose(0, 1) for t in (q, k))  # (H, L, d)
    cos, sin = rotary_tables(L, C // H, device=idx.device)
    scores = apply_rotary(q, cos, sin) @ apply_rotary(k, cos, sin).transpose(-1, -2) / math.sqrt(C // H)
    mask = pattern_mask(c.pattern, L, causal=c.causal, device=idx.device, **c.pattern_params())
    return scores.masked_fill(~mask, float("-inf")).softmax(-1)


def shape_key(config: AttentionConfig) -> tuple[Any, ...]:
    """What the members of one model must share; everything else (head count, pattern, rates,
    learning rate, seed) can differ between them."""
    return (config.d_model, config.n_layers, config.batch_size, config.causal)


def build_model(
    configs: Members, task: Task, *, backend: str = "auto", heads: tuple[int, int] | None = None
) -> AttentionModel:
    """The model ``configs`` describe (one configuration, or a population's), sized for ``task``
    (vocabulary, classes, sequence length); each member's weights come from its own seed.
    ``heads``: the (min, max) head counts refills may bring, which sets a population's head groups
    from the start (see :class:`SparseSelfAttention`)."""
    return AttentionModel(
        configs,
        vocab_size=task.vocab_size,
        n_classes=task.n_classes,
        max_len=task.seq_len,
        backend=backend,
        heads=heads,
    )


def count_params(model: nn.Module) -> int:
    """Trainable parameters of one member."""
    return sum(p[0].numel() for p in model.parameters() if p.requires_grad)


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
