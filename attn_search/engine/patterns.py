"""Attention sparsity patterns, each defined once.

A pattern is a *mask rule* ``rule(q_idx, kv_idx) -> bool tensor`` written with broadcasting torch
ops only. The same rule serves three purposes:

* evaluated on index grids it gives the dense boolean mask (:func:`pattern_mask`), which the
  ``reference`` kernel uses and from which the exact density is counted;
* reduced over tiles it gives the block layout (:class:`BlockLayout`) that the ``blocked``
  kernel computes with (only non-empty tiles are touched);
* passed unchanged as FlexAttention's ``mask_mod`` it builds the ``BlockMask`` of the ``flex``
  kernel.

Conventions: ``mask[i, j] == True`` means query ``i`` may attend key ``j``. ``causal=True`` adds
``j <= i`` to every rule. Every pattern keeps the diagonal, so no query row is ever empty.
Densities below are fractions of the ``L x L`` grid (for causal patterns, of the full grid too, so
dense causal has density ``(L + 1) / (2 L)``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import torch

Rule = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclasses.dataclass(frozen=True)
class PatternParam:
    """One parameter a pattern reads: an :class:`~attn_search.engine.config.AttentionConfig` field."""

    name: str
    default: int
    minimum: int
    short: str
    """Its label in :meth:`~attn_search.engine.config.AttentionConfig.describe` (``""``: not shown)."""


@dataclasses.dataclass(frozen=True)
class Pattern:
    """A pattern, declared once: its name, the parameters it reads and its mask rule.

    ``rule(seq_len=..., device=..., causal=..., **params) -> Rule`` builds the non-causal rule for
    sequences of ``seq_len`` (``causal`` is passed for rules whose tables depend on it; the causal
    cut itself is added by :func:`pattern_rule`). Everything else is derived from the declaration:
    :data:`PATTERN_PARAMS`, :data:`PATTERN_DEFAULTS`, the parameters' checks, the config's
    validation and ``describe()`` labels, the written configs' fields.
    """

    name: str
    params: tuple[PatternParam, ...]
    rule: Callable[..., Rule]


WINDOW = PatternParam("window", 32, 1, "w")
DILATION = PatternParam("dilation", 2, 1, "d")
STRIDE = PatternParam("stride", 16, 1, "s")
BLOCK_SIZE = PatternParam("block_size", 16, 1, "b")
N_GLOBAL = PatternParam("n_global", 1, 0, "g")
N_RANDOM = PatternParam("n_random", 1, 0, "r")
SEED = PatternParam("seed", 0, 0, "")  # BigBird's random blocks (the trial's seed: not shown)

DECLARED: dict[str, Pattern] = {}
"""Every declared pattern by name (:func:`declare_pattern`)."""
PATTERN_PARAMS: dict[str, tuple[str, ...]] = {}
"""Which keyword parameters each declared pattern reads (derived from :data:`DECLARED`)."""
PATTERN_DEFAULTS: dict[str, int] = {}
"""Each pattern parameter's default (derived from :data:`DECLARED`)."""
PARAM_SPECS: dict[str, PatternParam] = {}
"""Each pattern parameter's declaration by name (derived from :data:`DECLARED`)."""


def declare_pattern(pattern: Pattern) -> Pattern:
    """Register ``pattern`` so that configs, searches, every attention kernel and the export can
    use it. A parameter shared by two patterns must be declared the same way in both."""
    for p in pattern.params:
        known = PARAM_SPECS.get(p.name)
        if known is not None and known != p:
            raise ValueError(f"pattern {pattern.name!r}: parameter {p.name!r} is declared as {known} elsewhere")
    DECLARED[pattern.name] = pattern
    PATTERN_PARAMS[pattern.name] = tuple(p.name for p in pattern.params)
    for p in pattern.params:
        PARAM_SPECS[p.name] = p
        PATTERN_DEFAULTS[p.name] = p.default
    return pattern


def undeclare_pattern(name: str) -> None:
    """Remove a declared pattern (its parameters stay declared: other patterns may read them)."""
    DECLARED.pop(name, None)
    PATTERN_PARAMS.pop(name, None)


def _dense_rule() -> Rule:
    """All pairs. Density 1 (bidirectional)."""
    return lambda q, kv: (q >= 0) & (kv >= 0)


def _window_rule(window: int) -> Rule:
    """Sliding window: ``|i - j| < window``.

    Each query sees ``2 window - 1`` keys bidirectionally and ``window`` keys causally (itself and
    the ``window - 1`` before it). Density ~ ``(2w - 1) / L`` (bidirectional), ``w / L`` (causal),
    less at the sequence edges.
    """
    return lambda q, kv: (q - kv).abs() < window


def _dilated_rule(window: int, dilation: int) -> Rule:
    """Dilated sliding window (Longformer's dilation): keys ``j = i + m * dilation``, ``|m| < window``.

    The same number of keys as ``window`` (so the same FLOPs) spread over a span ``dilation`` times
    wider. Density ~ ``(2w - 1) / L`` bidirectional, ``w / L`` causal, less at the edges.
    """
    return lambda q, kv: ((q - kv).abs() < window * dilation) & ((q - kv) % dilation == 0)


def _strided_rule(stride: int) -> Rule:
    """Sparse Transformer strided attention (Child et al. 2019, arXiv:1904.10509), both heads' sets
    merged: a local band ``|i - j| < stride`` plus every ``stride``-th key ``(i - j) % stride == 0``.

    Density ~ ``(2 s - 1) / L + 1 / s`` bidirectional, ``s / L + 1 / (2 s)`` causal; minimal for
    ``s ~ sqrt(L)``.
    """
    return lambda q, kv: ((q - kv).abs() < stride) | ((q - kv) % stride == 0)


def bigbird_block_table(n_blocks: int, *, n_global: int, n_random: int, seed: int, causal: bool) -> torch.Tensor:
    """The (n_blocks, n_blocks) boolean block table of BigBird (Zaheer et al. 2020, arXiv:2007.14062).

    Query block ``a`` attends key block ``b`` when ``|a - b| <= 1`` (the 3-block sliding window),
    when ``a`` or ``b`` is one of the first ``n_global`` blocks (global blocks), or when ``b`` is one
    of ``n_random`` key blocks drawn for ``a`` with a ``torch.Generator`` seeded by ``seed`` from the
    blocks not already attended (and, if causal, not in the future). The draw depends only on
    ``(n_blocks, n_global, n_random, seed, causal)``, so every kernel sees the same blocks.
    """
    idx = torch.arange(n_blocks)
    table = ((idx[:, None] - idx[None, :]).abs() <= 1) | (idx[:, None] < n_global) | (idx[None, :] < n_global)
    if causal:
        table &= idx[None, :] <= idx[:, None]
    gen = torch.Generator().manual_seed(seed)
    for a in range(n_blocks):
        allowed = ~table[a]
        if causal:
            allowed &= idx <= a
        cand = allowed.nonzero().flatten()
        if n_random > 0 and len(cand) > 0:
            pick = cand[torch.randperm(len(cand), generator=gen)[:n_random]]
            table[a, pick] = True
    return table


def _bigbird_rule(block_size: int, table: torch.Tensor) -> Rule:
    """BigBird block-sparse: ``table[i // block_size, j // block_size]`` (see
    :func:`bigbird_block_table`). Density ~ ``(3 + 2 g + r) b / L`` bidirectional with ``g`` global
    and ``r`` random blocks of size ``b``.

    The rule must stay pointwise to serve as FlexAttention's ``mask_mod`` on CUDA: the table is
    flattened and already on the device the rule will be called on, and it is read with one index
    computed from the two positions (attention-gym's ``document_mask`` pattern). A copy inside the
    rule (``table.to(q.device)``) creates a buffer, which Inductor cannot lower in a pointwise
    subgraph. Block ids are clamped into the table: FlexAttention's kernels evaluate the rule on
    whole 128-position tiles, past the sequence's end, and an unclamped read there would leave the
    table (an illegal memory access on CUDA); those positions are masked out anyway.
    """
    n_blocks = table.shape[1]
    flat = table.flatten()  # (n_blocks * n_blocks,)

    def rule(q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        qb = torch.clamp(q // block_size, max=n_blocks - 1)
        kb = torch.clamp(kv // block_size, max=n_blocks - 1)
        return flat[qb * n_blocks + kb]

    return rule


def _longformer_rule(window: int, n_global: int) -> Rule:
    """Longformer (Beltagy et al. 2020, arXiv:2004.05150): sliding window ``|i - j| < window`` plus
    the first ``n_global`` tokens, which attend every key and are attended by every query.

    Density ~ ``(2w - 1) / L + 2 g / L`` bidirectional, ``w / L + g / L`` causal (a global query
    sees only the past when causal).
    """
    return lambda q, kv: ((q - kv).abs() < window) | (q < n_global) | (kv < n_global)


def _bigbird(*, seq_len: int, device: torch.device | str, causal: bool, block_size: int, n_global: int,
             n_random: int, seed: int) -> Rule:  # fmt: skip
    table = bigbird_block_table(math.ceil(seq_len / block_size), n_global=n_global, n_random=n_random, seed=seed,
                                causal=causal).to(device)  # fmt: skip
    return _bigbird_rule(block_size, table)


def _dense(**_: Any) -> Rule:
    return _dense_rule()


def _window(*, window: int, **_: Any) -> Rule:
    return _window_rule(window)


def _dilated(*, window: int, dilation: int, **_: Any) -> Rule:
    return _dilated_rule(window, dilation)


def _strided(*, stride: int, **_: Any) -> Rule:
    return _strided_rule(stride)


def _longformer(*, window: int, n_global: int, **_: Any) -> Rule:
    return _longformer_rule(window, n_global)


# The built-in patterns, in the order documentation and tests list them. Each rule builder is a
# named module-level function: the Python export copies its source and that of what it calls.
declare_pattern(Pattern("dense", (), _dense))
declare_pattern(Pattern("window", (WINDOW,), _window))
declare_pattern(Pattern("dilated", (WINDOW, DILATION), _dilated))
declare_pattern(Pattern("strided", (STRIDE,), _strided))
declare_pattern(Pattern("bigbird", (BLOCK_SIZE, N_GLOBAL, N_RANDOM, SEED), _bigbird))
declare_pattern(Pattern("longformer", (WINDOW, N_GLOBAL), _longformer))
PATTERNS = tuple(DECLARED)
"""Names of the built-in patterns (:data:`DECLARED` also holds any declared later)."""


def _check_positive(name: str, value: Any, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r} is invalid: it must be an integer >= {minimum}")
    return value


def resolve_params(pattern: str, **params: Any) -> dict[str, int]:
    """Validate ``pattern`` and return the parameters it reads, filling defaults.

    Parameters a pattern does not read are ignored, so a whole config's worth of keywords can be
    passed. Raises ``ValueError`` naming the offending parameter and what to use instead.
    """
    if pattern not in DECLARED:
        raise ValueError(f"pattern={pattern!r} is unknown: use one of {', '.join(DECLARED)}")
    out: dict[str, int] = {}
    for spec in DECLARED[pattern].params:
        value = params.get(spec.name)
        if value is None:
            value = spec.default
        out[spec.name] = _check_positive(spec.name, value, minimum=spec.minimum)
    return out


def pattern_rule(
    pattern: str, seq_len: int, *, causal: bool = False, device: torch.device | str = "cpu", **params: Any
) -> Rule:
    """The mask rule of ``pattern`` for sequences of length ``seq_len`` (see module docstring).

    ``device``: where the rule will be evaluated. Lookup tables it captures (BigBird's block
    table) are placed there once, so that the rule itself only does pointwise arithmetic and
    scalar-indexed reads, as FlexAttention's compiled ``mask_mod`` requires.
    """
    p = resolve_params(pattern, **params)
    rule = DECLARED[pattern].rule(seq_len=seq_len, device=device, causal=causal, **p)
    if not causal:
        return rule
    base = rule
    return lambda q, kv: base(q, kv) & (kv <= q)


def _rows(rule: Rule, start: int, stop: int, seq_len: int, device: torch.device | str = "cpu") -> torch.Tensor:
    q = torch.arange(start, stop, device=device)[:, None]
    kv = torch.arange(seq_len, device=device)[None, :]
    return rule(q, kv)


def pattern_mask(
    pattern: str, seq_len: int, *, causal: bool = False, device: torch.device | str = "cpu", **params: Any
) -> torch.Tensor:
    """Boolean mask ``(seq_len, seq_len)``; ``True`` where query ``i`` may attend key ``j``.

    Example:
        >>> pattern_mask("window", 4, causal=True, window=2).int().tolist()
        [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]
    """
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len} is invalid: it must be >= 1")
    rule = pattern_rule(pattern, seq_len, causal=causal, device=device, **params)
    return _rows(rule, 0, seq_len, seq_len, device)


def pattern_density(pattern: str, seq_len: int, *, causal: bool = False, **params: Any) -> float:
    """Exact fraction of ``True`` entries of :func:`pattern_mask`, counted by query tile so memory
    stays ``O(seq_len)`` per chunk even for long sequences. Cached: counting costs ``O(seq_len**2)``
    (seconds at 16K, where a search's FLOPs ranges and every trial's FLOPs ask for it)."""
    return _counts(pattern, seq_len, causal, tuple(sorted(params.items())))[0] / (seq_len * seq_len)


def pattern_entries(pattern: str, seq_len: int, *, causal: bool = False, **params: Any) -> int:
    """Number of (query, key) pairs the pattern keeps: ``density * seq_len**2`` as an integer."""
    return round(pattern_density(pattern, seq_len, causal=causal, **params) * seq_len * seq_len)


FLEX_BLOCK = 128
"""FlexAttention's default tile (``create_block_mask``'s ``BLOCK_SIZE``), with which the exported
layer's CUDA path builds its ``BlockMask``; 64 does not compile with torch 2.11's kernels
(``benchmarks/results/gpu_h200_2026-12-04.txt``)."""


def pattern_tile_entries(pattern: str, seq_len: int, *, causal: bool = False, **params: Any) -> int:
    """(query, key) pairs a block-sparse kernel computes for ``pattern``: every ``FLEX_BLOCK x FLEX_BLOCK``
    tile of the grid in which the pattern keeps at least one entry, counted whole (edge tiles at
    their real size, which FlexAttention pads: exact at lengths that are multiples of 128, as
    deployment lengths are): what FlexAttention computes for the exported layer on CUDA, where a BigBird block of 64 computes 2.4x the entries it keeps at L=8192, and a
    sequence no longer than one tile is dense's cost whatever the pattern. Cached with the density
    (one pass counts both)."""
    return _counts(pattern, seq_len, causal, tuple(sorted(params.items())))[1]


@functools.lru_cache(maxsize=4096)
def _counts(pattern: str, seq_len: int, causal: bool, params: tuple[tuple[str, Any], ...]) -> tuple[int, int]:
    """(entries the pattern keeps, entries of the ``FLEX_BLOCK`` tiles holding one), counted in one
    pass over query tiles, so memory stays ``O(seq_len)`` per tile even for long sequences."""
    block = FLEX_BLOCK
    rule = pattern_rule(pattern, seq_len, causal=causal, **dict(params))
    n = math.ceil(seq_len / block)
    width = torch.full((n,), block, dtype=torch.long)
    width[-1] = seq_len - (n - 1) * block
    kept = computed = 0
    needed = torch.zeros(n * block, dtype=torch.bool)
    for a in range(n):
        rows = _rows(rule, a * block, min((a + 1) * block, seq_len), seq_len)  # (<= block, L)
        kept += int(rows.sum())
        needed[:seq_len] = rows.any(0)  # the keys any query of this tile attends
        touched = needed.view(n, block).any(1)  # (n,): the key tiles it needs
        computed += rows.shape[0] * int(width[touched].sum())
    return kept, computed


def keeps_everything(pattern: str, seq_len: int, *, causal: bool = False, **params: Any) -> bool:
    """Whether the pattern's mask at ``seq_len`` is dense's (every entry, or every causal one):
    BigBird with 32-token blocks and 4 global blocks at L=256, a window of 128 at L=64. Every rule
    keeps a subset of dense's entries, so equal counts mean equal masks."""
    if pattern == "dense":
        return True
    return pattern_entries(pattern, seq_len, causal=causal, **params) == pattern_entries(
        "dense", seq_len, causal=causal
    )


@dataclasses.dataclass(frozen=True)
class TileBucket:
    """Query tiles that share one padded key width (see :class:`BlockLayout`)."""

    q_blocks: torch.Tensor  # (n, ) int64 query tile ids
    kv_blocks: torch.Tensor  # (n, width) int64 key tile ids, padded by repeating a valid id
    bias: torch.Tensor | None  # (n, block, width * block) float32: 0 kept, -inf dropped; None if all kept
    q_start: int | None  # when q_blocks is the contiguous range [q_start, q_start + n): slice, no gather

    @property
    def width(self) -> int:
        return int(self.kv_blocks.shape[1])


@dataclasses.dataclass(frozen=True)
class BlockLayout:
    """Tile layout of a pattern for a tile size ``block``.

    Queries and keys are cut into ``n_blocks = ceil(L / block)`` tiles (the last one padded). For
    each query tile we list the key tiles holding at least one kept entry. Query tiles are grouped
    into buckets of similar list length, each padded to its own width, so a few dense rows (the
    global tokens of Longformer and BigBird) do not force every row to full width. Inside a bucket
    the ``bias`` is ``0`` where kept and ``-inf`` elsewhere (padding slots, padded keys, dropped
    entries of partial tiles), or ``None`` when every tile in the bucket is full. Padded *query*
    rows get a zero bias row so they never produce NaNs (their outputs are discarded).
    """

    seq_len: int
    block: int
    n_blocks: int
    buckets: tuple[TileBucket, ...]
    inverse_order: torch.Tensor | None  # undoes the bucket order of query tiles; None if identity
    kept_entries: int  # (query, key) pairs the pattern keeps
    computed_entries: int  # pairs the blocked kernel computes (real query rows x bucket width)

    @property
    def tile_density(self) -> float:
        """Fraction of the ``n_blocks x n_blocks`` tile grid that is computed (padding included)."""
        return sum(len(b.q_blocks) * b.width for b in self.buckets) / self.n_blocks**2


def _bucket_tiles(counts: list[int]) -> list[list[int]]:
    """Group tile ids so that inside a group no count is below half of the largest one: padding
    wastes at most 2x on the (few) tiles that are merged upwards, and the number of groups stays
    logarithmic in the spread of counts."""
    order = sorted(range(len(counts)), key=lambda a: (-counts[a], a))
    groups: list[list[int]] = []
    for a in order:
        if groups and 2 * counts[a] >= counts[groups[-1][0]]:
            groups[-1].append(a)
        else:
            groups.append([a])
    return [sorted(g) for g in groups]


def block_layout(pattern: str, seq_len: int, *, block: int = 64, causal: bool = False, **params: Any) -> BlockLayout:
    """Compute the tile layout of ``pattern`` (see :class:`BlockLayout`)."""
    if block < 1:
        raise ValueError(f"block={block} is invalid: it must be >= 1")
    rule = pattern_rule(pattern, seq_len, causal=causal, **params)
    n_blocks = math.ceil(seq_len / block)
    padded = n_blocks * block
    lists: list[torch.Tensor] = []
    tiles_of: list[torch.Tensor] = []
    kept_entries = 0
    for a in range(n_blocks):
        rows = _rows(rule, a * block, min((a + 1) * block, seq_len), seq_len)  # (<=block, L)
        kept_entries += int(rows.sum())
        tile = torch.zeros(block, padded, dtype=torch.bool)
        tile[: rows.shape[0], :seq_len] = rows
        tiles = tile.view(block, n_blocks, block)  # (block, n_blocks, block)
        lists.append(tiles.any(dim=2).any(dim=0).nonzero().flatten())
        tiles_of.append(tiles)
    buckets: list[TileBucket] = []
    computed = 0
    for group in _bucket_tiles([len(x) for x in lists]):
        width = max(len(lists[a]) for a in group)
        kv_blocks = torch.empty(len(group), width, dtype=torch.long)
        bias = torch.full((len(group), block, width * block), float("-inf"))
        all_kept = True
        for i, a in enumerate(group):
            ids = lists[a]
            n = len(ids)
            kv_blocks[i, :n] = ids
            kv_blocks[i, n:] = ids[0]  # padding slots point at a real tile; their bias is -inf
            kept = tiles_of[a][:, ids, :].reshape(block, n * block)  # (block, n*block)
            bias[i, :, : n * block].masked_fill_(kept, 0.0)
            real_rows = min(block, seq_len - a * block)
            computed += real_rows * width * block
            all_kept = all_kept and n == width and bool(kept[:real_rows].all())
            bias[i, real_rows:, :] = 0.0  # padded query rows: keep finite, outputs are discarded
        contiguous = group == list(range(group[0], group[0] + len(group)))
        buckets.append(
            TileBucket(
                q_blocks=torch.tensor(group, dtype=torch.long),
                kv_blocks=kv_blocks,
                bias=None if all_kept else bias,
                q_start=group[0] if contiguous else None,
            )
        )
    order = torch.cat([b.q_blocks for b in buckets])
    identity = bool((order == torch.arange(n_blocks)).all())
    return BlockLayout(
        seq_len=seq_len,
        block=block,
        n_blocks=n_blocks,
        buckets=tuple(buckets),
        inverse_order=None if identity else torch.argsort(order),
        kept_entries=kept_entries,
        computed_entries=computed,
    )
