"""How a population's members attend: the member layout a trainer chooses for a model of several
configurations (:class:`~attn_search.engine.model.SparseSelfAttention` with ``K > 1``).

* ``per-member`` (the CPU's default): each member attends on the single-pattern path its own
  trial takes (:func:`single_paths`; the block-sparse kernel), since on the CPU arithmetic, not launches,
  bounds a step;
* ``grouped`` (CUDA's, and forced on the CPU by tests and benchmarks): members grouped by head
  count, each group at its own head shape, one FlexAttention kernel per group over all members
  with fixed shapes, so refills rewrite table rows in place (:class:`MemberPlan`).

A single model (one member) never comes here: it is the single-pattern path, what the export
writes out as :mod:`attn_search.engine.plain`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from attn_search.engine.attention import (
    Attend,
    _cached_mask,
    _flex,
    _key,
    attention_plan,
    dropkey_mask,
    dropkey_score_mod,
    member_block_mask,
)
from attn_search.engine.config import AttentionConfig
from attn_search.engine.patterns import resolve_params
from attn_search.engine.plain import rotary as rotary_tables

LAYOUTS = ("auto", "grouped")
"""``auto``: per member on the CPU, grouped elsewhere; ``grouped``: grouped on every device."""


Alone = list[tuple[Attend, torch.Tensor, torch.Tensor]]
"""Per member: its own single-pattern ``attend(q, k, v)`` and rotary cos/sin tables."""


def single_paths(members: list[AttentionConfig], L: int, device: torch.device, *, kernel: str, dropout: bool,
           training: bool) -> Alone:  # fmt: skip
    """Each member's single-pattern attention plan (:func:`attention_plan`), the path its trial
    alone takes, with its rotary tables."""
    return [(attention_plan(c.pattern, L, causal=c.causal, kernel=kernel, device=device,
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


class MemberPlan:
    """What attention over several members needs, built once per (length, device, mode): the
    *grouped* head layout, the mask table, the BlockMasks (CUDA) and the attention-dropout rates.

    Members are grouped by head count: group ``h`` runs attention at its own shape ``(K, B*h, L,
    d_model/h)``, so no member carries a channel or head it does not have (a layout padded to
    ``max heads x widest head`` moved 4x the channels of a 2-, 4- and 8-head mix). On FlexAttention
    every group's kernel sees all ``K`` members with a BlockMask in which the other groups' members
    have no blocks (the kernel skips them), so shapes stay fixed whoever is refilled into a slot:
    one compiled kernel per head count, and a refill only rewrites table rows in place. The dense
    path (the CPU) gathers each group's members instead, since a fully masked row there is NaN."""

    def __init__(self, members: list[AttentionConfig], L: int, device: torch.device, *, kernel: str,
                 dropout: bool, heads: tuple[int, ...], layout: str = "auto") -> None:  # fmt: skip
        # FlexAttention on CUDA; on the CPU only where asked for and without gradients (PyTorch has
        # no CPU backward for it): evaluation passes
        rates = [c.attn_dropout for c in members]
        # (attention dropout is DropKey inside the kernel: it does not turn the fused path off)
        use_flex = ((device.type == "cuda" and kernel == "auto") or kernel == "flex") and not (
            device.type == "cpu" and dropout
        )
        # On the CPU arithmetic, not launches, bounds a step: each member attends on the path its
        # own trial takes (the block-sparse kernel skips masked tiles and drops attention inside
        # them; no materialised scores). Where shapes must stay fixed (CUDA) the grouped layout
        # serves all.
        self.alone: Alone | None = None
        self.L, self.device, self.dropout = L, device, dropout
        self.kernel_alone = "auto" if kernel == "flex" else kernel  # (no CPU backward for flex)
        self.block_masks: list[Any] | None = None
        self.score_mod: Any = None
        if device.type == "cpu" and not use_flex and layout == "auto":
            self.alone = single_paths(members, L, device, kernel=self.kernel_alone, dropout=dropout, training=dropout)
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
            self.alone[k] = single_paths([c], self.L, self.device, kernel=self.kernel_alone, dropout=self.dropout,
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
