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
  ``mask_mod`` reads with the batch index as the member), and the head count: members with fewer
  heads have wider heads, so attention runs in one padded layout of ``max(n_heads)`` heads of
  ``d_model / min(n_heads)`` channels. A member's heads fill the first rows and channels of it;
  zero channels add nothing to a score and zero heads give zero outputs, so each member computes
  exactly its own attention (with its own ``1/sqrt(head_dim)`` scale and rotary frequencies).
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
from attn_search.engine.patterns import resolve_params
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


def rotary_tables(
    seq_len: int, head_dim: int, *, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables ``(seq_len, head_dim / 2)`` of rotary position embeddings (Su et al.
    2021, arXiv:2104.09864), base 10000."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)  # (L, hs/2)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs ``(x[..., :hs/2], x[..., hs/2:])`` of ``x`` ``(..., L, hs)``."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


CPU_PER_MEMBER = True
"""On the CPU each member attends on its own single-pattern path (``False``: the padded layout CUDA
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


class _MemberPlan:
    """What attention over several members needs, built once per (length, device, mode) and
    rebuilt when a slot changes: the padded head layout, per-member rotary tables and scales, the
    mask table, the BlockMask (CUDA) and the attention-dropout rates."""

    def __init__(self, members: list[AttentionConfig], L: int, device: torch.device, *, backend: str,
                 dropout: bool, layout: tuple[int, int]) -> None:  # fmt: skip
        # FlexAttention on CUDA; on the CPU only where asked for and without gradients (PyTorch has
        # no CPU backward for it): evaluation passes
        rates = [c.attn_dropout for c in members]
        # (attention dropout is DropKey inside the kernel: it does not turn the fused path off)
        use_flex = ((device.type == "cuda" and backend == "auto") or backend == "flex") and not (
            device.type == "cpu" and dropout
        )
        # On the CPU arithmetic, not launches, bounds a step: each member attends on the path its
        # own trial takes (the block-sparse kernel skips masked tiles and drops attention inside
        # them; no padded heads, which cost a 2-head member 4x the work beside 8-head ones, nor
        # materialised scores). Where shapes must stay fixed (CUDA) the padded layout serves all.
        self.alone: Alone | None = None
        self.L, self.device, self.dropout = L, device, dropout
        self.backend_alone = "auto" if backend == "flex" else backend  # (no CPU backward for flex)
        self.block_mask: Any = None
        self.score_mod: Any = None
        if device.type == "cpu" and not use_flex and CPU_PER_MEMBER:
            self.alone = _alone(members, L, device, backend=self.backend_alone, dropout=dropout, training=dropout)
            return
        C = members[0].d_model
        heads = [c.n_heads for c in members]
        self.H, self.D = layout  # the padded layout: H heads of D channels
        K, D = len(members), self.D
        self.masks = torch.empty(K, L, L, dtype=torch.bool, device=device)
        self.cos = torch.empty(K, 1, L, D // 2, device=device)  # (K, 1, L, D/2)
        self.sin = torch.empty(K, 1, L, D // 2, device=device)
        self.scale = torch.empty(K, 1, 1, 1, device=device)
        self.index = torch.empty(K, 1, 1, C, dtype=torch.long, device=device)
        for k, c in enumerate(members):
            self._fill(k, c)
        # (one head count filling the layout: no spreading; a refill with another rebuilds the plan)
        self.spreads = not all(h == self.H and C // h == D for h in heads)
        self.attn_p = torch.tensor(rates, device=device) if dropout and any(rates) else None
        self.block_mask = member_block_mask(self.masks) if use_flex else None
        self.score_mod = None
        if self.block_mask is not None and self.attn_p is not None:
            self.seed = torch.randint(0, 2**31 - 1, (), device=device)  # advanced in place each step
            self.score_mod = dropkey_score_mod(self.attn_p, self.seed, per_batch=True)

    def _fill(self, k: int, c: AttentionConfig) -> None:
        """Slot ``k``'s rows of every table, written in place."""
        L, D, C, h = self.L, self.D, c.d_model, c.n_heads
        d = C // h
        key = _key(c.pattern, L, c.causal, resolve_params(c.pattern, **c.pattern_params()))
        self.masks[k].copy_(_cached_mask(key, str(self.device)))
        cos, sin = rotary_tables(L, d, device=self.device)
        self.cos[k].fill_(1.0)
        self.sin[k].fill_(0.0)
        self.cos[k, 0, :, : d // 2], self.sin[k, 0, :, : d // 2] = cos, sin
        self.scale[k].fill_(1.0 / math.sqrt(d))
        # member channel head*d + j -> padded channel head*D + j (first half) or + D/2 (second half)
        j = torch.arange(d)
        slot = torch.where(j < d // 2, j, j - d // 2 + D // 2)
        self.index[k].copy_((torch.arange(h)[:, None] * D + slot[None]).flatten().view(1, 1, C))

    def set_member(self, k: int, c: AttentionConfig) -> bool:
        """Refill slot ``k`` in place, so every tensor keeps its storage (``data_ptr``) and a
        captured step or compiled kernel stays valid. ``False`` where the plan cannot hold ``c``
        (another head layout, attention dropout where none was planned): the caller rebuilds it."""
        if self.alone is not None:
            self.alone[k] = _alone([c], self.L, self.device, backend=self.backend_alone, dropout=self.dropout,
                                   training=self.dropout)[0]  # fmt: skip
            return True
        C = c.d_model
        if C // c.n_heads > self.D or c.n_heads > self.H or (not self.spreads and c.n_heads != self.H):
            return False
        if self.dropout and c.attn_dropout > 0 and self.attn_p is None:
            return False
        self._fill(k, c)
        if self.attn_p is not None:
            self.attn_p[k] = c.attn_dropout if self.dropout else 0.0
        if self.block_mask is not None:  # the new pattern's blocks, copied into the same tensors
            fresh = member_block_mask(self.masks)
            for name in _BLOCK_MASK_TENSORS:
                old, new = getattr(self.block_mask, name), getattr(fresh, name)
                if old is not None:
                    old.copy_(new)
        return True

    def spread(self, t: torch.Tensor) -> torch.Tensor:
        """``(K, B, L, C)`` -> ``(K, B, L, H*D)``: each member's channels at their padded positions."""
        if not self.spreads:
            return t
        K, B, L, C = t.shape
        out = t.new_zeros(K, B, L, self.H * self.D)
        return out.scatter(-1, self.index.expand(K, B, L, C), t)

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`spread`."""
        if not self.spreads:
            return t
        K, B, L, _ = t.shape
        return t.gather(-1, self.index.expand(K, B, L, self.index.shape[-1]))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``(K, B*H, L, D)`` each, ``q`` already scaled: the member's pattern is row ``member`` of the table."""
        if self.block_mask is not None:
            if self.score_mod is not None:
                self.seed.add_(1)
            return _flex(q, k, v, self.block_mask, scale=1.0, score_mod=self.score_mod)
        return _rows_attend(q, k, v, self.masks, self.attn_p, scale=1.0)


def _rows_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, masks: torch.Tensor, attn_p: torch.Tensor | None,
                 scale: float | None = None) -> torch.Tensor:  # fmt: skip
    """Attention of ``(K, BH, L, D)`` inputs where member ``k`` sees row ``k`` of ``masks`` ``(K, L, L)``
    and drops keys (DropKey) with rate ``attn_p[k]`` (``None``: no member drops). The dense path of
    the padded layout where FlexAttention cannot run (the CPU): its masks are materialised."""
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
        # members' padded head layout (H heads of D channels): it starts at the head counts refills
        # may bring (``heads``: the space's range) and only grows, so refills keep its shape and
        # FlexAttention's kernel
        self.layout = (0, 0) if heads is None else (max(heads), C // min(heads))
        # per (length, device, mode): what attention needs, built on first use so that a training
        # step resolves, looks up and builds nothing
        self._plans: dict[tuple[Any, ...], Any] = {}

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
                del self._plans[key]

    def keep_members(self, slots: list[int]) -> None:
        self.members = [self.members[k] for k in slots]
        self._plans.clear()

    def _plan(self, L: int, device: torch.device) -> Any:
        key = (L, device, self.training, torch.is_grad_enabled())
        plan = self._plans.get(key)
        if plan is not None:
            return plan
        if len(self.members) > 1:
            C = self.members[0].d_model
            heads = [c.n_heads for c in self.members]
            self.layout = (max(self.layout[0], *heads), max(self.layout[1], C // min(heads)))
            plan = _MemberPlan(self.members, L, device, backend=self.backend,
                               dropout=self.training and torch.is_grad_enabled(), layout=self.layout)  # fmt: skip
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
            H, D = plan.H, plan.D
            q, k, v = (
                plan.spread(t).view(K, B, L, H, D).permute(0, 1, 3, 2, 4).reshape(K, B * H, L, D) for t in (q, k, v)
            )  # (K, BH, L, D)
            q = apply_rotary(q, plan.cos, plan.sin) * plan.scale.to(q.dtype)
            k = apply_rotary(k, plan.cos, plan.sin)
            y = plan.attend(q, k, v).view(K, B, H, L, D).permute(0, 1, 3, 2, 4).reshape(K, B, L, H * D)
            y = plan.gather(y)  # (K, B, L, C)
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
            block.attn._plans.clear()


def shape_key(config: AttentionConfig) -> tuple[Any, ...]:
    """What the members of one model must share; everything else (head count, pattern, rates,
    learning rate, seed) can differ between them."""
    return (config.d_model, config.n_layers, config.batch_size, config.causal)


def build_model(
    configs: Members, task: Task, *, backend: str = "auto", heads: tuple[int, int] | None = None
) -> AttentionModel:
    """The model ``configs`` describe (one configuration, or a population's), sized for ``task``
    (vocabulary, classes, sequence length); each member's weights come from its own seed.
    ``heads``: the (min, max) head counts refills may bring, which sizes a population's padded
    attention layout from the start (see :class:`SparseSelfAttention`)."""
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
