"""Sparse attention kernels that compute the same function.

* ``reference``: dense ``scaled_dot_product_attention`` with the pattern's boolean mask (or
  ``is_causal`` for dense causal). The ground truth every other kernel is tested against.
* ``blocked``: block-sparse. Queries and keys are cut into tiles; for each query tile only the key
  tiles the pattern touches are gathered and computed (see :class:`~attn_search.engine.patterns.BlockLayout`).
  A hand-written autograd function, so it trains on CPU and GPU, under autocast too (it computes
  in the autocast dtype, softmax in float32). Memory and time are ``O(L * keys_per_query)``
  instead of ``O(L^2)``. Fast on CPU; on CUDA its gathers make it slower than dense SDPA.
* ``flex``: ``torch.nn.attention.flex_attention`` with a ``BlockMask`` built from the same mask rule.
  Compiled; trains on CUDA. On CPU it runs forward only (PyTorch has no CPU backward for it). Head
  dims below 16 (which its kernels refuse) are zero-padded to 16 with the scale of the true head
  dim, which is exact: padded channels add 0 to every score and produce discarded output columns.
* ``auto``: on CUDA ``flex`` for sparse patterns and whenever attention dropout trains,
  ``reference`` (SDPA's flash kernel) for dense without it. On CPU ``blocked`` when training with
  attention dropout; otherwise ``blocked`` when the layout skips enough tiles to pay for its
  gathers, else ``reference``.

Attention dropout is DropKey (Li et al., CVPR 2023, arXiv:2304.05939) on every kernel: each key
but the query's own is dropped from a query's softmax with probability ``p`` (its score set to
``-inf`` before the softmax, which renormalises over the keys kept; nothing is rescaled). It is a
different regulariser from dropout on the probabilities after the softmax, chosen because it can
live inside a fused kernel: FlexAttention has no attention dropout (PyTorch issue 141784), but a
``score_mod`` can drop a score, so on CUDA the drop is a counter-based hash of (seed, batch, head,
query, key) evaluated in the kernel (:func:`dropkey_score_mod`) and no mask or score tensor is
ever stored. The CPU's blocked kernel draws the same Bernoulli(p) drops from torch's generator.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from attn_search.engine.patterns import (
    BlockLayout,
    block_layout,
    keeps_everything,
    pattern_mask,
    pattern_rule,
    resolve_params,
)
from attn_search.engine.plain import compiled_flex, hash_uniform

KERNELS = ("auto", "reference", "blocked", "flex")

DEFAULT_TILE = 64
"""Tile size of the blocked kernel. 64 balances per-tile overhead against work wasted in partial
tiles on CPU (see ``benchmarks/sparse_vs_dense.py --tile``)."""

# Below this fraction of tiles computed the blocked kernel beats masked dense SDPA on CPU; above it
# the gathers cost more than the skipped tiles save (measured with benchmarks/sparse_vs_dense.py).
_BLOCKED_MAX_TILE_DENSITY = 0.6


def _key(pattern: str, seq_len: int, causal: bool, params: dict[str, int]) -> tuple[Any, ...]:
    return (pattern, seq_len, causal, tuple(sorted(params.items())))


@functools.lru_cache(maxsize=64)
def _cached_layout(key: tuple[Any, ...], tile: int) -> BlockLayout:
    pattern, seq_len, causal, items = key
    return block_layout(pattern, seq_len, block=tile, causal=causal, **dict(items))


@functools.lru_cache(maxsize=64)
def _cached_mask(key: tuple[Any, ...], device: str) -> torch.Tensor:
    pattern, seq_len, causal, items = key
    return pattern_mask(pattern, seq_len, causal=causal, device=device, **dict(items))


def layout_for(
    pattern: str, seq_len: int, *, causal: bool = False, tile: int = DEFAULT_TILE, **params: Any
) -> BlockLayout:
    """The (cached) tile layout the blocked kernel uses."""
    p = resolve_params(pattern, **params)
    return _cached_layout(_key(pattern, seq_len, causal, p), min(tile, _pow2_at_least(seq_len)))


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def dropout_mask(like: torch.Tensor, p: float) -> torch.Tensor:
    """Boolean keep-mask with ``P(keep) = 1 - p``.

    Why not ``bernoulli_`` (what ``F.dropout`` uses): on CPU it costs about 13 softmaxes of the same
    size and 3x a uniform draw compared with a threshold (measured: 132 ms vs 40 ms for 6.3M
    elements), and attention dropout draws one value per score.
    """
    return torch.rand_like(like) >= p


# Score buffers are processed in chunks of at most this many bytes. Small enough to stay in cache
# between the GEMM, softmax and second GEMM, and far below glibc's 32 MiB mmap ceiling, above which
# every fresh buffer is a new mapping that page-faults on first touch (measured: a 39 MB gather
# took 18 ms, a 24 MB one 0.7 ms).
_CHUNK_BYTES = 4 << 20


def _chunks(layout: BlockLayout, bh: int, elem: int) -> list[tuple[int, int, int, int, int]]:
    """(bucket index, head start, head stop, tile start, tile stop) work items for the layout."""
    items = []
    for i, bucket in enumerate(layout.buckets):
        nb = len(bucket.q_blocks)
        per_tile = layout.block * bucket.width * layout.block * elem  # bytes of one tile's scores
        per_head = per_tile * nb
        if per_head <= _CHUNK_BYTES:
            step = max(1, _CHUNK_BYTES // per_head)
            items += [(i, h, min(h + step, bh), 0, nb) for h in range(0, bh, step)]
        else:
            step = max(1, _CHUNK_BYTES // per_tile)
            items += [(i, h, h + 1, t, min(t + step, nb)) for h in range(bh) for t in range(0, nb, step)]
    return items


class _BlockSparseAttention(torch.autograd.Function):
    """Block-sparse attention over a :class:`BlockLayout`, with a hand-written backward.

    Why not plain autograd: on CPU the generic graph spent more time than the GEMMs themselves in
    softmax-backward, reshape copies of strided gradients, zero fills, bias adds and gradient
    accumulation across buckets (profiled with ``benchmarks/sparse_vs_dense.py``). Here one node
    covers the whole layout in cache-sized chunks: scores are biased and soft-maxed in place,
    outputs are written straight into their tiles, and the backward uses FlashAttention's identity
    ``dS = P * (dP - rowsum(dO * O))`` (Dao et al. 2022, arXiv:2205.14135) in place, scattering
    key/value gradients into one buffer with ``index_add_``. Forward and gradients are checked
    against the reference kernel in tests.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        qt: torch.Tensor,  # (BH, n, T, D), already scaled by 1/sqrt(D)
        kt: torch.Tensor,  # (BH, n, T, D)
        vt: torch.Tensor,  # (BH, n, T, D)
        layout: BlockLayout,
        dropout_p: float,
    ) -> torch.Tensor:
        BH, n, T, D = qt.shape
        out = torch.empty_like(qt)
        needs_grad = any(ctx.needs_input_grad[:3])
        meta: list[tuple[int, int, slice | None]] = []
        tensors: list[torch.Tensor | None] = []
        dev = qt.device
        for b, h0, h1, t0, t1 in _chunks(layout, BH, qt.element_size()):
            bucket = layout.buckets[b]
            nt = t1 - t0
            if bucket.q_start is not None:
                q_sel: slice | torch.Tensor = slice(bucket.q_start + t0, bucket.q_start + t1)
                qi = qt[h0:h1, q_sel]  # (hb, nt, T, D), a view
            else:
                q_sel = bucket.q_blocks[t0:t1].to(dev)
                qi = qt[h0:h1].index_select(1, q_sel)
            flat = bucket.kv_blocks[t0:t1].to(dev).flatten()  # (nt * W,)
            kg = kt[h0:h1].index_select(1, flat).view(h1 - h0, nt, -1, D)  # (hb, nt, W*T, D)
            vg = vt[h0:h1].index_select(1, flat).view(h1 - h0, nt, -1, D)
            s = torch.matmul(qi, kg.transpose(-1, -2))  # (hb, nt, T, W*T)
            if bucket.bias is not None:
                s.add_(bucket.bias[t0:t1].to(device=dev, dtype=s.dtype))
            if dropout_p > 0:  # DropKey: scores dropped before the softmax, a query's own key kept
                drop = ~dropout_mask(s, dropout_p) & ~_tile_diagonal(bucket, t0, t1, T, dev)
                s.masked_fill_(drop, float("-inf"))
            p = torch.softmax(s, dim=-1, dtype=_acc(s.dtype)).to(s.dtype)  # at least float32 inside
            del s
            o = torch.matmul(p, vg)  # (hb, nt, T, D)
            if isinstance(q_sel, slice):
                out[h0:h1, q_sel] = o
            else:
                out[h0:h1].index_copy_(1, q_sel, o)
            if needs_grad:  # inference keeps no score-sized buffers alive
                # Gathered key/value tiles are not kept: re-gathering them in backward costs ~1% of
                # the step and saves W copies of K and V per chunk.
                # (dropped keys have P = 0, so the backward needs no mask of its own)
                meta.append((h0, h1, q_sel if isinstance(q_sel, slice) else None))
                tensors += [None if isinstance(q_sel, slice) else q_sel, p, flat]
        ctx.meta = meta
        ctx.save_for_backward(out, qt, kt, vt, *tensors)
        return out

    @staticmethod
    def backward(ctx: Any, dout: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        out, qt, kt, vt, *tensors = ctx.saved_tensors
        dout = dout.contiguous()
        BH, n, T, D = dout.shape
        acc = _acc(dout.dtype)
        delta = (dout.to(acc) * out.to(acc)).sum(dim=-1, keepdim=True)  # (BH, n, T, 1) = rowsum(dP * P)
        dq = torch.empty_like(dout)
        dk = torch.zeros_like(dout)
        dv = torch.zeros_like(dout)
        for c, (h0, h1, sl) in enumerate(ctx.meta):
            q_ids, p, flat = tensors[3 * c : 3 * c + 3]
            q_sel = sl if sl is not None else q_ids
            if isinstance(q_sel, slice):
                qi, do, dl = qt[h0:h1, q_sel], dout[h0:h1, q_sel], delta[h0:h1, q_sel]
            else:
                qi = qt[h0:h1].index_select(1, q_sel)
                do, dl = dout[h0:h1].index_select(1, q_sel), delta[h0:h1].index_select(1, q_sel)
            nt = p.shape[1]
            kg = kt[h0:h1].index_select(1, flat).view(h1 - h0, nt, -1, D)  # (hb, nt, W*T, D)
            vg = vt[h0:h1].index_select(1, flat).view(h1 - h0, nt, -1, D)
            dp = torch.matmul(do, vg.transpose(-1, -2))  # (hb, nt, T, W*T)
            dv_g = torch.matmul(p.transpose(-1, -2), do)  # (hb, nt, W*T, D)
            # dS = P * (dP - delta), in place; for bf16/fp16 inputs the difference of two near-equal
            # terms is taken in float32
            ds = dp.sub_(dl).mul_(p) if dp.dtype == acc else dp.to(acc).sub_(dl).mul_(p).to(dp.dtype)
            dq_i = torch.matmul(ds, kg)  # (hb, nt, T, D)
            dk_g = torch.matmul(ds.transpose(-1, -2), qi)  # (hb, nt, W*T, D)
            if isinstance(q_sel, slice):
                dq[h0:h1, q_sel] = dq_i
            else:
                dq[h0:h1].index_copy_(1, q_sel, dq_i)
            dk[h0:h1].index_add_(1, flat, dk_g.view(h1 - h0, -1, T, D))
            dv[h0:h1].index_add_(1, flat, dv_g.view(h1 - h0, -1, T, D))
        return dq, dk, dv, None, None


def _tile_diagonal(bucket: Any, t0: int, t1: int, T: int, dev: torch.device) -> torch.Tensor:
    """``(nt, T, W*T)`` boolean: where a gathered key is the query itself (DropKey never drops it,
    so no query's row is ever empty)."""
    q_blocks = bucket.q_blocks[t0:t1].to(dev)  # (nt,)
    kv_blocks = bucket.kv_blocks[t0:t1].to(dev)  # (nt, W)
    same = (kv_blocks == q_blocks[:, None])[:, None, :, None]  # (nt, 1, W, 1)
    eye = torch.eye(T, dtype=torch.bool, device=dev)[None, :, None, :]  # (1, T, 1, T)
    return (same & eye).reshape(len(q_blocks), T, -1)


def _acc(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of softmax and its backward: float32, or the inputs' if wider."""
    return torch.promote_types(dtype, torch.float32)


def _compute_dtype(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.dtype:
    """The dtype a hand-written kernel computes in: autocast's when it is on for the tensors'
    device (what the matmuls would run in), else the inputs' common dtype."""
    dev = q.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)


def _blocked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout, dropout_p: float) -> torch.Tensor:
    # Autocast is switched off around the autograd function and every operand cast to one dtype:
    # under autocast its matmuls would run in bf16 but its softmax in float32, and the backward
    # (which autocast does not cover) would then multiply float32 by bf16 tensors and fail.
    dtype = _compute_dtype(q, k, v)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    with torch.autocast(q.device.type, enabled=False):
        return _blocked_impl(q, k, v, layout, dropout_p)


def _blocked_impl(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout, dropout_p: float
) -> torch.Tensor:
    B, H, L, D = q.shape
    bs, n = layout.block, layout.n_blocks
    pad = n * bs - L
    q = q * (1.0 / math.sqrt(D))  # scale the small operand, not the scores
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    qt, kt, vt = (t.reshape(B * H, n, bs, D).contiguous() for t in (q, k, v))  # (BH, n, bs, D)
    o = _BlockSparseAttention.apply(qt, kt, vt, layout, dropout_p)
    o = o.view(B, H, n * bs, D)
    return o[:, :, :L] if pad else o


FLEX_MIN_HEAD_DIM = 16
"""FlexAttention's compiled kernels refuse smaller head dims; :func:`_flex` pads up to it."""

FLEX_COMPILE = True
"""Compile FlexAttention (its fused kernel). ``False`` runs PyTorch's eager reference of the same
BlockMask semantics: slow and O(L^2) memory, used by the CPU test matrix to avoid a compile per
case."""

_FLEX_COMPILED: Any = None
"""A stand-in for the compiled function (a test's counting compile); ``None``: the plain model's."""
_FLEX_KERNELS = 256
_limits_raised = False


def _flex_fn() -> Any:
    """FlexAttention compiled: the plain model's compiled function (one ``torch.compile`` of it in
    the process, so both models' kernels share dynamo's cache and its limits), with more kernels
    allowed than the plain model needs."""
    global _limits_raised
    from torch.nn.attention.flex_attention import flex_attention

    if not FLEX_COMPILE:
        return flex_attention
    if _FLEX_COMPILED is not None:
        return _FLEX_COMPILED
    compiled = compiled_flex()
    if not _limits_raised:
        import torch._dynamo.config as dynamo_config

        # Patterns are read from tables (TABLE_MASK_MAX_LEN), so a kernel is compiled per length,
        # head dim and batch shape, not per pattern; past dynamo's default of 8 recompiles it would
        # silently fall back to eager FlexAttention, which materialises every score (measured:
        # 0.06x dense SDPA for the 9th). Lengths past the table's limit compile a kernel per
        # pattern and parameters, so allow many kernels.
        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, _FLEX_KERNELS)
        dynamo_config.accumulated_recompile_limit = max(dynamo_config.accumulated_recompile_limit, 4 * _FLEX_KERNELS)
        _limits_raised = True
    return compiled


TABLE_MASK_MAX_LEN = 4096
"""Up to this length FlexAttention's ``mask_mod`` reads the pattern from a boolean table ``(L, L)``
instead of computing it: every pattern and parameter value is then the same compiled kernel (a
rule with a window of 6 baked in is another kernel than one with 8, so a search would compile one
per configuration and reach dynamo's recompile limit). Longer sequences use the computed rule
(a table would take ``L**2`` bytes)."""


@functools.lru_cache(maxsize=32)
def _cached_block_mask(key: tuple[Any, ...], device: str) -> Any:
    from torch.nn.attention.flex_attention import create_block_mask

    pattern, seq_len, causal, items = key
    if seq_len <= TABLE_MASK_MAX_LEN:
        return member_block_mask(_cached_mask(key, device)[None])
    rule = pattern_rule(pattern, seq_len, causal=causal, device=device, **dict(items))  # tables on `device`
    return create_block_mask(
        lambda b, h, q_idx, kv_idx: rule(q_idx, kv_idx), None, None, seq_len, seq_len, device=device
    )


def member_mask_mod(masks: torch.Tensor, members: torch.Tensor | None = None) -> Callable[..., torch.Tensor]:
    """FlexAttention's ``mask_mod`` for members whose patterns are the rows of ``masks`` ``(K, L, L)``:
    the batch index is the member. ``members`` ``(K,)`` bool, where given, keeps only the members it
    marks (the others see nothing: a head group's kernel skips them). Pointwise (computed indices,
    no copy or reduction), and the tables stay on the device ``masks`` lives on, as CUDA's lowering
    needs. The same code for every table, so a new table (a new pattern, a refilled slot) reuses
    the compiled kernel."""
    K, L, _ = masks.shape
    flat = masks.reshape(-1)  # (K * L * L,)
    if K == 1 and members is None:  # one pattern for every batch row

        def one_mask_mod(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
            return flat[torch.clamp(q, max=L - 1) * L + torch.clamp(kv, max=L - 1)]

        return one_mask_mod

    def mask_mod(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        # positions past L (FlexAttention evaluates whole tiles) read the last row/column: masked by padding
        return flat[b * (L * L) + torch.clamp(q, max=L - 1) * L + torch.clamp(kv, max=L - 1)]

    if members is None:
        return mask_mod

    def group_mask_mod(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        return mask_mod(b, h, q, kv) & members[b]

    return group_mask_mod


def member_block_mask(masks: torch.Tensor, members: torch.Tensor | None = None) -> Any:
    """One BlockMask for the members whose patterns are the rows of ``masks`` ``(K, L, L)``
    (:func:`member_mask_mod`, ``members`` as there); the attention batch index is the member (a
    single member's mask broadcasts over the batch)."""
    from torch.nn.attention.flex_attention import create_block_mask

    K, L, _ = masks.shape
    batch = K if K > 1 or members is not None else None
    return create_block_mask(member_mask_mod(masks, members), batch, None, L, L, device=str(masks.device))


def _flex(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: Any,
    scale: float | None = None,
    score_mod: Callable[..., torch.Tensor] | None = None,
) -> torch.Tensor:
    """FlexAttention with ``block_mask`` (``scale`` default ``1/sqrt(head dim)``) and an optional
    ``score_mod`` (DropKey); head dims below 16 zero-padded (exact, see below)."""
    if q.device.type == "cpu" and any(t.requires_grad for t in (q, k, v)):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "kernel='flex' cannot train on CPU: PyTorch has no CPU backward for FlexAttention; "
                "use kernel='blocked' (or 'auto') for training on CPU"
            )
        # under no_grad FlexAttention still refuses inputs that require grad on CPU
        q, k, v = q.detach(), k.detach(), v.detach()
    D = q.shape[-1]
    if D >= FLEX_MIN_HEAD_DIM:
        return _flex_fn()(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale)
    # FlexAttention's kernels need head dim >= 16: zero channels change no score (q . k is the same)
    # and give zero output columns, which are cut off; the scale stays that of the true head dim.
    pad = FLEX_MIN_HEAD_DIM - D
    q, k, v = (F.pad(t, (0, pad)) for t in (q, k, v))  # (B, H, L, 16)
    out = _flex_fn()(q, k, v, score_mod=score_mod, block_mask=block_mask,
                     scale=1.0 / math.sqrt(D) if scale is None else scale)  # fmt: skip
    return out[..., :D]


def dropkey_score_mod(rates: torch.Tensor, seed: torch.Tensor, *, per_batch: bool) -> Callable[..., torch.Tensor]:
    """FlexAttention ``score_mod`` of DropKey: score ``(b, h, q, kv)`` becomes ``-inf`` with
    probability ``rates[b]`` (``per_batch``: the batch index is a population's member) or
    ``rates[0]``, never on the diagonal. ``rates`` and the 0-dim ``seed`` are captured tables on the
    query's device, read with scalar indices; a caller advances ``seed`` in place each step, so the
    compiled kernel (and a captured CUDA graph) stays the same."""

    def score_mod(
        score: torch.Tensor, b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor
    ) -> torch.Tensor:
        p = rates[b] if per_batch else rates[0]
        drop = (hash_uniform(seed, b, h, q, kv) < p) & (q != kv)
        return torch.where(drop, float("-inf"), score)

    return score_mod


def dropkey_mask(shape: tuple[int, ...], p: torch.Tensor | float, *, device: torch.device | str) -> torch.Tensor:
    """Boolean ``(..., L, L)`` mask of the keys DropKey keeps, drawn from torch's generator (the
    dense paths): each off-diagonal entry is dropped with probability ``p`` (a float, or per leading
    row ``(K,)``)."""
    L = shape[-1]
    u = torch.rand(shape, device=device)
    if isinstance(p, torch.Tensor):
        p = p.view(-1, *([1] * (len(shape) - 1)))
    return (u >= p) | torch.eye(L, dtype=torch.bool, device=device)


def choose_kernel(
    pattern: str,
    seq_len: int,
    *,
    device: torch.device | str,
    training: bool,
    dropout_p: float = 0.0,
    causal: bool = False,
    **params: Any,
) -> str:
    """The kernel ``auto`` resolves to for these arguments (see module docstring)."""
    dev = torch.device(device).type
    if dev == "cuda":
        if training and dropout_p > 0:
            return "flex"  # DropKey inside the kernel (dense too): no score or mask is stored
        return "reference" if pattern == "dense" else "flex"  # flash attention for dense
    if training and dropout_p > 0:
        # SDPA with dropout falls back to its math path and a Bernoulli draw per score on CPU,
        # several times slower than the blocked path's threshold mask, whatever the density.
        return "blocked"
    if pattern == "dense":
        return "reference"
    layout = layout_for(pattern, seq_len, causal=causal, **params)
    return "blocked" if layout.tile_density <= _BLOCKED_MAX_TILE_DENSITY else "reference"


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    pattern: str,
    causal: bool = False,
    kernel: str = "auto",
    dropout_p: float = 0.0,
    tile: int | None = None,
    **params: Any,
) -> torch.Tensor:
    """Attention of ``q`` over ``k, v`` restricted to ``pattern``.

    Args:
        q, k, v: ``(B, H, L, D)`` tensors on the same device and dtype.
        pattern: one of :data:`~attn_search.engine.patterns.PATTERNS`.
        causal: also drop keys after the query.
        kernel: ``auto``, ``reference``, ``blocked`` or ``flex`` (see module docstring).
        dropout_p: DropKey's rate (see the module docstring): each key but the query's own is
            dropped from a query's softmax with this probability.
        tile: tile size of the ``blocked`` kernel (default :data:`DEFAULT_TILE`, capped at the
            sequence length rounded up to a power of two).
        **params: the pattern's parameters (``window``, ``dilation``, ``stride``, ``block_size``,
            ``n_global``, ``n_random``, ``seed``); extra keywords are ignored.

    Returns:
        ``(B, H, L, D)`` attention output. Any ``L`` works; the last tile is padded internally.
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel={kernel!r} is unknown: use one of {', '.join(KERNELS)}")
    if q.dim() != 4 or q.shape != k.shape or k.shape != v.shape:
        raise ValueError(
            f"q, k, v must share one (B, H, L, D) shape; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    return attention_plan(
        pattern, q.shape[2], causal=causal, kernel=kernel, dropout_p=dropout_p, device=q.device,
        training=torch.is_grad_enabled(), tile=tile, **params,
    )(q, k, v)  # fmt: skip


Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def attention_plan(
    pattern: str,
    seq_len: int,
    *,
    causal: bool = False,
    kernel: str = "auto",
    dropout_p: float = 0.0,
    device: torch.device | str = "cpu",
    training: bool = False,
    tile: int | None = None,
    **params: Any,
) -> Attend:
    """Everything :func:`sparse_attention` decides before it computes, decided once: the pattern's
    parameters resolved, the kernel chosen, the mask, tile layout or BlockMask built. Returns
    ``attend(q, k, v)`` for inputs of that length on that device, with nothing left to look up per
    call (a model keeps one per length, device and mode: ``SparseSelfAttention``)."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel={kernel!r} is unknown: use one of {', '.join(KERNELS)}")
    p = resolve_params(pattern, **params)
    if kernel == "auto" and keeps_everything(pattern, seq_len, causal=causal, **p):
        # a sparse pattern whose mask keeps every entry at this length is dense attention: SDPA's
        # fused kernels (flash attention on CUDA) instead of a block-sparse pass over a full mask
        pattern, p = "dense", {}
    key = _key(pattern, seq_len, causal, p)
    dev = torch.device(device)
    if kernel == "auto":
        kernel = choose_kernel(pattern, seq_len, device=dev, training=training, dropout_p=dropout_p, causal=causal,
                                 **p)  # fmt: skip
    if kernel == "reference":
        if dropout_p > 0:  # DropKey as a drawn mask (the dense reference materialises it)
            mask = _cached_mask(key, str(dev))
            return lambda q, k, v: F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask & dropkey_mask((*q.shape[:2], seq_len, seq_len), dropout_p, device=q.device)
            )
        if pattern == "dense":
            return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        mask = _cached_mask(key, str(dev))
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if kernel == "blocked":
        if tile is not None and tile < 1:
            raise ValueError(f"tile={tile} is invalid: it must be >= 1")
        layout = _cached_layout(key, tile or min(DEFAULT_TILE, _pow2_at_least(seq_len)))
        return lambda q, k, v: _blocked(q, k, v, layout, dropout_p)
    block_mask = _cached_block_mask(key, str(dev))
    if dropout_p > 0:
        # the seed starts from torch's generator (a trial's seed fixes it) and advances in place
        seed = torch.randint(0, 2**31 - 1, (), device=dev)
        rates = torch.tensor([dropout_p], device=dev)
        score_mod = dropkey_score_mod(rates, seed, per_batch=False)

        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            seed.add_(1)
            return _flex(q, k, v, block_mask, score_mod=score_mod)

        return attend
    return lambda q, k, v: _flex(q, k, v, block_mask)
