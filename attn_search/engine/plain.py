"""One attention model, plain: no member axis, one attention path per device, torch alone.

This is what a lone trial trains (:mod:`attn_search.engine.single`) and what the Python export
writes out (``attn-search export --format python``), with the searched pattern's rule and
configuration appended, and what a user reads: nanoGPT's layout
(pre-LayerNorm blocks, GELU MLP, a per-position head) with the search's model around it (token and
previous-token embeddings, rotary positions) and attention restricted to a pattern, given as a rule
``pattern_rule(seq_len, device) -> rule(q_idx, kv_idx) -> bool`` (causality included).

Attention takes the path that saves the compute the pattern skips on each device:

* CUDA: FlexAttention with the pattern's BlockMask (the kernel skips empty blocks); attention
  dropout is DropKey inside the kernel (a ``score_mod`` drawing from a counter-based hash);
* CPU: the pattern's tiles (:class:`Tiles`): query tiles grouped by the key tiles they need,
  gathered, attended in cache-sized chunks (PyTorch has no CPU backward for FlexAttention); where
  more than :data:`MAX_TILE_DENSITY` of the tile grid would be computed (short sequences) and the
  layer has no attention dropout, SDPA over the pattern's mask (the search's own kernel choice
  switches likewise, at its own kernel's crossover);
* a mask that keeps every entry at the length in use: SDPA's fused dense kernel.

``tests/test_export.py`` checks that this model, given the search's weights (``load_searched``),
computes what the search trained, for every pattern, forward and backward.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

Rule = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
RuleFactory = Callable[[int, torch.device], Rule]
TILE = 64
MAX_TILE_DENSITY = 0.4
"""Above this fraction of the tile grid computed, the CPU attends over the whole mask with SDPA
(``benchmarks/export_paths.py``, forward+backward: at density 0.50 the tiles take 0.87-1.07x SDPA's
time, at 0.62-0.81 1.2-1.5x, at 0.34 and below 0.3-0.7x)."""
FLEX_MIN_HEAD_DIM = 16  # FlexAttention's kernels need head dims >= 16: smaller ones are zero-padded (exact)


def pattern_mask_of(rule_of: RuleFactory, seq_len: int, device: torch.device) -> torch.Tensor:
    """The ``(L, L)`` boolean mask of a rule: ``True`` where a query may attend a key."""
    idx = torch.arange(seq_len, device=device)
    return rule_of(seq_len, device)(idx[:, None], idx[None, :])


def rotary(seq_len: int, head_dim: int, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables ``(seq_len, head_dim / 2)`` of rotary positions (Su et al. 2021), base 10000."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)  # (L, d/2)
    return angles.cos(), angles.sin()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary positions (Su et al. 2021) on ``(..., L, d)``: channel pairs ``(j, j + d/2)``."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


def dropkey_keep(shape: tuple[int, ...], p: float, device: torch.device) -> torch.Tensor:
    """DropKey's kept keys (Li et al. 2023): each off-diagonal score dropped before the softmax with
    probability ``p``; the diagonal is kept, so no row is empty."""
    return (torch.rand(shape, device=device) >= p) | torch.eye(*shape[-2:], dtype=torch.bool, device=device)


class Tiles:
    """The CPU path: the ``(L, L)`` mask cut into ``tile x tile`` blocks; each query tile attends
    only the key tiles holding a kept entry. Query tiles needing similar numbers of key tiles (within
    2x) form a group whose key lists are padded to one width, so a chunk of the group is one
    gather and one masked attention (:class:`_TileAttention`); the work is about the kept tiles,
    not ``L**2``."""

    def __init__(self, mask: torch.Tensor, tile: int = TILE) -> None:
        L = mask.shape[0]
        n = math.ceil(L / tile)
        self.L, self.padded = L, n * tile
        full = torch.zeros(self.padded, self.padded, dtype=torch.bool, device=mask.device)
        full[:L, :L] = mask
        pad = torch.arange(L, self.padded, device=mask.device)
        full[pad, pad] = True  # padded query rows see their own padded key (no NaN, no extra tile); cut off
        needed = full.view(n, tile, n, tile).any(3).any(1)  # (n, n): query tile a needs key tile b
        counts = needed.sum(1).tolist()
        order = sorted(range(n), key=lambda a: -counts[a])
        self.tile = tile
        self.groups: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        span = torch.arange(tile, device=mask.device)
        while order:
            width = counts[order[0]]
            members = [a for a in order if 2 * counts[a] >= width]
            order = [a for a in order if 2 * counts[a] < width]
            lists = [needed[a].nonzero().flatten() for a in members]
            kv = torch.stack([torch.cat([ids, ids[:1].expand(width - len(ids))]) for ids in lists])  # (g, width)
            qt = torch.tensor(members, device=mask.device)  # (g,)
            rows, keys = qt[:, None] * tile + span, (kv[:, :, None] * tile + span).flatten(1)  # (g, tile), (g, w*tile)
            allowed = full[rows[:, :, None], keys[:, None, :]]  # (g, tile, width*tile)
            for i, ids in enumerate(lists):  # a padded slot repeats a real tile: it must add nothing
                allowed[i, :, len(ids) * tile :] = False
            self.groups.append((qt, kv, ~allowed))
        self.density = sum(kv.numel() for _, kv, _ in self.groups) / n**2  # tiles computed

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, drop: float) -> torch.Tensor:
        pad = self.padded - q.shape[2]
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        return _TileAttention.apply(q, k, v, self, scale, drop)[:, :, : self.L]

    def chunks(self, B: int, H: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(query tiles, their key tiles, blocked entries) of a few query tiles at a time: score buffers
        of about 4 MB stay in cache (and below glibc's mmap threshold, where fresh pages fault)."""
        for qt, kv, blocked in self.groups:
            g, width = kv.shape
            step = max(1, (4 << 20) // (B * H * self.tile * width * self.tile * 4))
            for a in range(0, g, step):
                yield qt[a : a + step], kv[a : a + step].flatten(), blocked[a : a + step]


class _TileAttention(torch.autograd.Function):
    """Attention over :class:`Tiles` with a hand-written backward: per chunk, scores soft-maxed
    and outputs written in place; the backward re-gathers keys and values and uses
    FlashAttention's ``dS = P * (dP - rowsum(dO * O))`` (Dao et al. 2022). Plain autograd over
    gathers and index copies costs about twice the time on CPU."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tiles: Tiles, scale: float,
                drop: float) -> torch.Tensor:  # fmt: skip
        B, H, L, D = q.shape
        T = tiles.tile
        acc = torch.promote_types(q.dtype, torch.float32)  # softmax in float32 at least
        out = q.new_empty(q.shape)
        # tiled views (B, H, n, T, D): a gather moves whole tiles, not single rows
        q4, k4, v4, out4 = (t.reshape(B, H, -1, T, D) for t in (q, k, v, out))
        probs = []
        for qt, keys, blocked in tiles.chunks(B, H):
            n, _, wide = blocked.shape
            kg = k4.index_select(2, keys).view(B, H, n, wide, D)
            s = torch.matmul(q4.index_select(2, qt), kg.transpose(-1, -2)).to(acc).mul_(scale)  # (B, H, n, T, wide)
            if drop > 0:  # DropKey before the softmax; a query's own key is kept
                span = torch.arange(T, device=q.device)
                own = (keys.view(n, -1, 1) * T + span).view(n, 1, wide) == (qt.view(n, 1, 1) * T + span.view(1, T, 1))
                blocked = blocked | ((torch.rand(s.shape, device=q.device) < drop) & ~own)
            p = s.masked_fill_(blocked, float("-inf")).softmax(-1).to(q.dtype)
            out4.index_copy_(2, qt, torch.matmul(p, v4.index_select(2, keys).view(B, H, n, wide, D)))
            probs.append(p)
        ctx.tiles, ctx.scale, ctx.probs = tiles, scale, probs
        ctx.save_for_backward(q, k, v, out)
        return out

    @staticmethod
    def backward(ctx: Any, dout: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v, out = ctx.saved_tensors
        B, H, L, D = q.shape
        T = ctx.tiles.tile
        acc = torch.promote_types(q.dtype, torch.float32)
        delta = (dout.to(acc) * out.to(acc)).sum(-1, keepdim=True).view(B, H, -1, T, 1)  # (B, H, n, T, 1)
        dq, dk, dv = (q.new_zeros(q.shape) for _ in range(3))
        q4, k4, v4, do4, dq4, dk4, dv4 = (t.reshape(B, H, -1, T, D) for t in (q, k, v, dout, dq, dk, dv))
        for (qt, keys, _), p in zip(ctx.tiles.chunks(B, H), ctx.probs, strict=True):
            n, wide = p.shape[2], p.shape[4]
            do = do4.index_select(2, qt)  # (B, H, n, T, D)
            kg, vg = (t.index_select(2, keys).view(B, H, n, wide, D) for t in (k4, v4))
            ds = (torch.matmul(do, vg.transpose(-1, -2)).to(acc) - delta.index_select(2, qt)) * p
            ds = ds.to(q.dtype) * ctx.scale
            dq4.index_copy_(2, qt, torch.matmul(ds, kg))
            dk4.index_add_(2, keys, torch.matmul(ds.transpose(-1, -2), q4.index_select(2, qt)).view(B, H, -1, T, D))
            dv4.index_add_(2, keys, torch.matmul(p.transpose(-1, -2), do).view(B, H, -1, T, D))
        return dq, dk, dv, None, None, None


def _mix32(x: torch.Tensor) -> torch.Tensor:  # murmur3's finaliser on 32 bits in int64 (products wrap: masked)
    x = ((x ^ (x >> 16)) * 0x85EBCA6B) & 0xFFFFFFFF
    x = ((x ^ (x >> 13)) * 0xC2B2AE35) & 0xFFFFFFFF
    return x ^ (x >> 16)


def hash_uniform(seed: torch.Tensor, b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> Any:
    """Uniform in ``[0, 1)`` per ``(seed, b, h, q, kv)``: a stream per ``(seed, b, h)``, then the position (16 bits
    an index). Two rounds: Inductor inlines a ``score_mod`` as a tree (five rounds took minutes to compile)."""
    stream = _mix32((seed.long() * 0x165667B1 + b.long() * 0x27D4EB2F + h.long() * 0x61C88647) & 0xFFFFFFFF)
    x = _mix32(stream ^ (((((q.long() & 0xFFFF) << 16) | (kv.long() & 0xFFFF)) * 0x2545F491) & 0xFFFFFFFF))
    return (x >> 8).to(torch.float32) * (1.0 / (1 << 24))


def dropkey_score_mod(p: torch.Tensor, seed: torch.Tensor) -> Callable[..., torch.Tensor]:
    """DropKey in FlexAttention: each score but the diagonal ``-inf`` with probability ``p`` (0-dim tensors)."""
    return lambda score, b, h, q, kv: torch.where((hash_uniform(seed, b, h, q, kv) < p) & (q != kv), -math.inf, score)


_FLEX: Any = None


def compiled_flex() -> Any:
    """FlexAttention compiled once (uncompiled it materialises every score). A kernel per length, head dim and
    batch shape: past dynamo's limit of 8 it would fall back to eager silently, so it is raised. Dynamo imports
    the mods' module by name: loaded by runpy or exec_module alone it cannot, so a copy gets a private name."""
    global _FLEX
    if getattr(sys.modules.get(__name__), "compiled_flex", None) is not compiled_flex:  # (not the own name:
        alias = globals()["__name__"] = f"_attn_search_plain_{id(globals()):x}"  # %run's __main__ is the user's)
        vars(sys.modules.setdefault(alias, type(sys)(alias))).update(globals())
    if _FLEX is None:
        from torch.nn.attention.flex_attention import flex_attention

        _FLEX = torch.compile(flex_attention, dynamic=False)  # (imports dynamo, whose limit follows)
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return _FLEX


def table_mask_mod(mask: torch.Tensor) -> Callable[..., torch.Tensor]:
    """FlexAttention's ``mask_mod`` reading the ``(L, L)`` mask: pointwise, the table on the query's
    device; positions past ``L`` (the kernel evaluates whole tiles) are clamped into it."""
    L, flat = mask.shape[0], mask.flatten()
    return lambda b, h, q, kv: flat[torch.clamp(q, max=L - 1) * L + torch.clamp(kv, max=L - 1)]


class PatternAttention(nn.Module):
    """Multi-head self-attention restricted to a pattern: ``(B, L, d_model) -> (B, L, d_model)``."""

    def __init__(self, d_model: int, n_heads: int, rule_of: RuleFactory, *, dropout: float = 0.0,
                 attn_dropout: float = 0.0) -> None:  # fmt: skip
        super().__init__()
        assert d_model % n_heads == 0 and (d_model // n_heads) % 2 == 0, "head dim must be even (rotary)"
        self.n_heads, self.head_dim, self.rule_of = n_heads, d_model // n_heads, rule_of
        self.attn_dropout = attn_dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.resid_drop = nn.Dropout(dropout)
        self._plans: dict[tuple[int, torch.device], Any] = {}
        self._seed: torch.Tensor | None = None

    def _plan(self, L: int, device: torch.device) -> Any:
        """Built once per length and device: rotary tables, and the mask's path."""
        if (L, device) not in self._plans:
            mask = pattern_mask_of(self.rule_of, L, device)
            cos, sin = rotary(L, self.head_dim, device)
            dense = bool(mask.equal(torch.ones_like(mask).tril())) or bool(mask.all())  # (in disguise, too)
            if dense and not (device.type == "cuda" and self.attn_dropout > 0):
                path: Any = ("dense", bool(~mask.all()), mask)
            elif device.type == "cuda":  # (DropKey in the kernel, dense too: no L x L mask is drawn)
                from torch.nn.attention.flex_attention import create_block_mask

                block_mask = create_block_mask(table_mask_mod(mask), None, None, L, L, device=device)
                path = ("flex", block_mask, mask)
            else:
                tiles = Tiles(mask)  # (with attention dropout always: a drawn L x L mask costs more)
                masked = tiles.density > MAX_TILE_DENSITY and self.attn_dropout == 0
                path = ("masked", None, mask) if masked else ("tiles", tiles, mask)
            self._plans[L, device] = (cos, sin, path)
        return self._plans[L, device]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        L, D = q.shape[2], self.head_dim
        cos, sin, (kind, what, mask) = self._plan(L, q.device)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        drop = self.attn_dropout if self.training else 0.0
        scale = 1.0 / math.sqrt(D)
        if kind == "flex":
            return self.flex((q, k, v), what, scale, drop)
        if kind == "tiles":
            return what(q, k, v, scale, drop)
        if kind == "masked" or drop > 0:  # the whole mask (with DropKey: the drawn one)
            if drop > 0:
                mask = mask & dropkey_keep((*q.shape[:2], L, L), drop, q.device)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return F.scaled_dot_product_attention(q, k, v, is_causal=what)

    def flex(self, qkv: tuple[torch.Tensor, ...], block_mask: Any, scale: float, drop: float) -> torch.Tensor:
        """FlexAttention over the pattern's BlockMask, DropKey at rate ``drop`` in the kernel (rate and
        seed are tensors: one kernel for every rate); head dims below 16 zero-padded (exact)."""
        dev, D, score_mod = qkv[0].device, qkv[0].shape[-1], None
        if drop > 0:
            if self._seed is None or self._seed.device != dev:  # (with the rate: drawn on first use)
                self._seed, self._rate = torch.randint(0, 2**31 - 1, (), device=dev), torch.zeros((), device=dev)
            score_mod = dropkey_score_mod(self._rate.fill_(drop), self._seed.add_(1))
        q, k, v = (F.pad(t, (0, max(0, FLEX_MIN_HEAD_DIM - D))) for t in qkv)
        return compiled_flex()(q, k, v, block_mask=block_mask, score_mod=score_mod, scale=scale)[..., :D]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, C = x.shape
        q, k, v = (t.view(B, L, self.n_heads, self.head_dim).transpose(1, 2) for t in self.qkv(x).split(C, dim=-1))
        y = self.attend(q, k, v).transpose(1, 2).reshape(B, L, C)
        return self.resid_drop(self.proj(y))


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, rule_of: RuleFactory, *, dropout: float,
                 attn_dropout: float) -> None:  # fmt: skip
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = PatternAttention(d_model, n_heads, rule_of, dropout=dropout, attn_dropout=attn_dropout)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc = nn.Linear(d_model, 4 * d_model)
        self.out = nn.Linear(4 * d_model, d_model)
        self.mlp_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp_drop(self.out(F.gelu(self.fc(self.ln2(x)))))


class PatternModel(nn.Module):
    """The searched model: ``(B, L)`` token ids -> ``(B, L, n_classes)`` logits."""

    def __init__(self, *, vocab_size: int, n_classes: int, d_model: int, n_heads: int, n_layers: int,
                 rule_of: RuleFactory, dropout: float = 0.0, attn_dropout: float = 0.0) -> None:  # fmt: skip
        super().__init__()
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.prev_emb = nn.Embedding(vocab_size, d_model)  # the previous token's (a token shift)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList([Block(d_model, n_heads, rule_of, dropout=dropout, attn_dropout=attn_dropout)
                                     for _ in range(n_layers)])  # fmt: skip
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, n_classes)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        prev = F.pad(idx[:, :-1], (1, 0))  # token at t-1, 0 at t=0
        x = self.drop(self.tok_emb(idx) + self.prev_emb(prev))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def load_searched(module: nn.Module, state_dict: dict[str, torch.Tensor], member: int = 0) -> None:
    """Load weights trained by attn_search into this plain ``module`` (``PatternModel`` or a layer):
    a lone trial's load as they are; a population's carry a member axis (``member`` picks one) and
    keep linear weights as ``(in, out)``, where ``nn.Linear`` keeps ``(out, in)``."""
    linear = {f"{name}.weight" for name, m in module.named_modules() if isinstance(m, nn.Linear)}
    own = module.state_dict()
    missing = set(own) - set(state_dict)
    assert not missing, f"weights missing from the searched state_dict: {sorted(missing)}"
    with torch.no_grad():
        for name, target in own.items():
            value = state_dict[name]
            if value.dim() == target.dim() + 1:  # a member axis
                value = value[member].T if name in linear else value[member]
            target.copy_(value)
