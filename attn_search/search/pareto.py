"""Pareto utilities: non-dominated sorting, exact hypervolume (2 and 3 objectives), selection.

Conventions. ``points`` is an ``(n, m)`` array-like; ``directions`` gives ``"maximize"`` or
``"minimize"`` per column. Internally every column is turned into a minimisation (maximised
columns are negated), so "dominates" means no worse in every objective and better in one.

Hypervolume is the measure of the region dominated by the points and bounded by the reference
point ``ref`` (given in the points' own units and directions: for a maximised objective the
reference is a lower bound, for a minimised one an upper bound). Points that do not strictly beat
``ref`` in every objective add nothing. :func:`normalized_hypervolume` first maps each objective
to ``[0, 1]`` with given bounds (accuracy in ``[0, 1]``; compute between the smallest and largest
value seen), so its result lies in ``[0, 1]`` and runs are comparable.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from attn_search.engine.metrics import MAXIMIZE, MINIMIZE


def _as_min(points: Sequence[Sequence[float]] | np.ndarray, directions: Sequence[str]) -> np.ndarray:
    arr = np.asarray(points, dtype=float)
    if arr.ndim != 2:
        arr = arr.reshape(len(arr), -1)
    if arr.shape[1] != len(directions):
        raise ValueError(f"points have {arr.shape[1]} objectives but {len(directions)} directions were given")
    signs = np.array([_sign(d) for d in directions])
    return arr * signs


def _sign(direction: str) -> float:
    if direction == MAXIMIZE:
        return -1.0
    if direction == MINIMIZE:
        return 1.0
    raise ValueError(f"direction {direction!r} is unknown: use 'maximize' or 'minimize'")


def non_dominated_ranks(points: Sequence[Sequence[float]] | np.ndarray, directions: Sequence[str]) -> np.ndarray:
    """Front index of every point (0 = non-dominated), by repeated peeling (Deb et al. 2002).

    Rows holding NaN get the worst rank.
    """
    arr = _as_min(points, directions)
    n = len(arr)
    ranks = np.full(n, n, dtype=int)
    valid = ~np.isnan(arr).any(axis=1)
    remaining = np.flatnonzero(valid)
    rank = 0
    while len(remaining):
        sub = arr[remaining]
        le = (sub[:, None, :] <= sub[None, :, :]).all(axis=2)  # le[i, j]: i no worse than j everywhere
        lt = (sub[:, None, :] < sub[None, :, :]).any(axis=2)
        dominated = (le & lt).any(axis=0)
        front = remaining[~dominated]
        ranks[front] = rank
        remaining = remaining[dominated]
        rank += 1
    return ranks


def pareto_front(points: Sequence[Sequence[float]] | np.ndarray, directions: Sequence[str]) -> np.ndarray:
    """Indices of the non-dominated points, sorted by the first objective (best first).

    Duplicated points are all kept (none dominates the other).
    """
    ranks = non_dominated_ranks(points, directions)
    idx = np.flatnonzero(ranks == 0)
    arr = _as_min(points, directions)
    return idx[np.lexsort(arr[idx].T[::-1])]


def hypervolume(
    points: Sequence[Sequence[float]] | np.ndarray, ref: Sequence[float], directions: Sequence[str]
) -> float:
    """Exact hypervolume dominated by ``points`` and bounded by ``ref`` (2 or 3 objectives).

    Two objectives: sweep over the sorted front. Three: slice along the third objective and sum
    2-D areas between consecutive cut levels. Both are exact; see the module docstring for the
    meaning of ``ref``.
    """
    arr = _as_min(points, directions)
    r = _as_min([ref], directions)[0]
    if arr.size == 0:
        return 0.0
    arr = arr[~np.isnan(arr).any(axis=1)]
    arr = arr[(arr < r).all(axis=1)]
    if len(arr) == 0:
        return 0.0
    m = arr.shape[1]
    if m == 1:
        return float(r[0] - arr[:, 0].min())
    if m == 2:
        return _hv2(arr, r)
    if m == 3:
        levels = np.unique(arr[:, 2])
        total = 0.0
        for i, z in enumerate(levels):
            z_next = levels[i + 1] if i + 1 < len(levels) else r[2]
            total += _hv2(arr[arr[:, 2] <= z][:, :2], r[:2]) * (z_next - z)
        return float(total)
    raise ValueError(f"exact hypervolume supports 1 to 3 objectives, not {m}")


def _hv2(arr: np.ndarray, r: np.ndarray) -> float:
    """Staircase sum over points sorted by the first objective (all strictly better than ``r``)."""
    pts = arr[np.lexsort((arr[:, 1], arr[:, 0]))]
    area = 0.0
    prev_y = r[1]
    for x, y in pts:
        if y < prev_y:
            area += (r[0] - x) * (prev_y - y)
            prev_y = y
    return float(area)


def normalize(
    points: Sequence[Sequence[float]] | np.ndarray, lower: Sequence[float], upper: Sequence[float]
) -> np.ndarray:
    """Map each column linearly so ``lower -> 0`` and ``upper -> 1`` (degenerate ranges -> 0)."""
    arr = np.asarray(points, dtype=float)
    lo, hi = np.asarray(lower, dtype=float), np.asarray(upper, dtype=float)
    span = np.where(hi > lo, hi - lo, 1.0)
    return (arr - lo) / span


def normalized_hypervolume(
    points: Sequence[Sequence[float]] | np.ndarray,
    directions: Sequence[str],
    *,
    lower: Sequence[float],
    upper: Sequence[float],
) -> float:
    """Hypervolume in ``[0, 1]`` after :func:`normalize` with the reference at the worst corner
    (0 for maximised objectives, 1 for minimised ones)."""
    norm = np.clip(normalize(points, lower, upper), 0.0, 1.0)
    ref = [0.0 if d == MAXIMIZE else 1.0 for d in directions]
    return hypervolume(norm, ref, directions)


def knee_point(points: Sequence[Sequence[float]] | np.ndarray, directions: Sequence[str]) -> int:
    """Index of the front point farthest from the line joining the front's extremes, after
    normalising each objective to ``[0, 1]`` over the front (two objectives; for more, the point
    closest to the normalised ideal point)."""
    arr = _as_min(points, directions)
    front = pareto_front(points, directions)
    if len(front) <= 2:
        return int(front[0])
    f = arr[front]
    lo, hi = f.min(axis=0), f.max(axis=0)
    g = (f - lo) / np.where(hi > lo, hi - lo, 1.0)
    if g.shape[1] == 2:
        a, b = g[0], g[-1]
        d = b - a
        norm = np.hypot(*d) or 1.0
        dist = np.abs(d[0] * (a[1] - g[:, 1]) - d[1] * (a[0] - g[:, 0])) / norm
        return int(front[int(np.argmax(dist))])
    return int(front[int(np.argmin(np.linalg.norm(g, axis=1)))])
