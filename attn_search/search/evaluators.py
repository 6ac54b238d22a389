"""Evaluators: how a proposal is scored, behind one interface.

``training`` really trains the small model (:func:`attn_search.engine.evaluate`); ``table:PATH``
looks the configuration up in a recorded trials table (``attn-search record``), so strategies can
be compared in seconds. Both know the values each parameter can take when a space is discretised
(the RL agent's action grid) and the range of a compute metric over the space, which fixes the
normalisation of the hypervolume (:func:`attn_search.search.pareto.normalized_hypervolume`).
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd

from attn_search.engine import metrics as M
from attn_search.engine.config import AttentionConfig
from attn_search.engine.cost import analytic_compute, model_attention_flops, model_attention_tile_flops
from attn_search.engine.tasks import make_task
from attn_search.engine.trainer import PRESETS, evaluate
from attn_search.search.space import SearchSpace


class Evaluator(Protocol):
    """Scores a configuration: returns its metrics, or ``None`` when the trial failed."""

    def __call__(self, config: AttentionConfig, values: Mapping[str, Any]) -> dict[str, float] | None: ...

    def bounds(self, space: SearchSpace, metric: str, grids: list[list[Any]]) -> tuple[float, float]:
        """Normalisation bounds ``(best, worst)`` of a compute metric over the discretised space."""
        ...

    def grids(self, space: SearchSpace, bins: int) -> list[list[Any]]:
        """The values each action dimension selects."""
        ...


def grids_of(space: SearchSpace, bins: int) -> list[list[Any]]:
    """The values each action dimension selects (see the module docstring)."""
    return [p.grid(bins) for p in space.params]


def decode(space: SearchSpace, grids: list[list[Any]], action: np.ndarray) -> dict[str, Any]:
    """Active parameter values selected by ``action`` (inactive dimensions dropped)."""
    chosen = {p.name: grid[int(a)] for p, grid, a in zip(space.params, grids, action, strict=True)}
    return space.active_values(chosen)


def table_key(space: SearchSpace, values: Mapping[str, Any]) -> tuple[Any, ...]:
    """Hashable key of a configuration's active values (floats rounded to 6 significant digits)."""
    active = space.active_values(values)
    return tuple((p.name, canonical(active.get(p.name))) for p in space.params)


def canonical(value: Any) -> Any:
    """A value in the form table keys compare (floats to 6 significant digits, numpy scalars as Python)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, bool | str):
        return value
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        return float(f"{float(value):.6g}")
    return value


class TrainingEvaluator:
    """Really trains each configuration (:func:`attn_search.evaluate`)."""

    def __init__(
        self,
        space: SearchSpace,
        *,
        preset: str = "smoke",
        device: str = "auto",
        task: str | None = None,
        task_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        self.task = task or space.task
        self.task_kwargs = dict(task_kwargs or {}) if task else dict(space.task_params)
        self.preset = preset
        self.device = device

        self.target_len = space.target_len

    def __call__(self, config: AttentionConfig, values: Mapping[str, Any]) -> dict[str, float] | None:
        base = PRESETS[self.preset] if isinstance(self.preset, str) else self.preset
        budget = dataclasses.replace(base, target_len=self.target_len)
        result = evaluate(config, self.task, budget=budget, device=self.device, task_kwargs=self.task_kwargs)
        return result.metrics if result.state == M.COMPLETE else None

    def grids(self, space: SearchSpace, bins: int) -> list[list[Any]]:
        return grids_of(space, bins)

    def bounds(self, space: SearchSpace, metric: str, grids: list[list[Any]]) -> tuple[float, float]:
        if metric not in (*M.ANALYTIC, M.PARAMS):
            raise ValueError(f"the training evaluator knows bounds for analytic compute and params only, not {metric}")
        task = make_task(self.task, **self.task_kwargs)
        length = self.target_len or task.seq_len  # compute is reported at the target length
        rng = np.random.default_rng(0)
        values = []
        for _ in range(256):  # analytic, so a sample of the grid gives the range cheaply
            action = np.array([rng.integers(len(g)) for g in grids])
            config = space.make_config(decode(space, grids, action))
            if metric in M.ANALYTIC:
                values.append(analytic_compute(metric, config, seq_len=length, n_classes=task.n_classes))
            else:
                d, L = config.d_model, config.n_layers
                values.append(2 * task.vocab_size * d + L * 12 * d * d + d * task.n_classes)
        return float(min(values)), float(max(values))


class TableEvaluator:
    """Looks configurations up in a recorded trials table (``attn-search record``).

    The table holds one row per configuration of the space discretised with the same ``bins``,
    with the columns of ``trials.csv``. A configuration that is not in the table is an error
    naming it (record the table with the env's ``bins``). Tables recorded with a ``curve`` column
    (:mod:`attn_search.record`) also give each row's learning curve (:meth:`curve`), so early
    stopping can be replayed on them.
    """

    def __init__(self, path: str | Path, space: SearchSpace) -> None:
        self.path = Path(path)
        self.compute_len = (
            recorded_compute_length(self.path) or make_task(space.task, **dict(space.task_params)).seq_len
        )
        """The length the table's compute counts at (its header's; else the space's task's)."""
        frame = pd.read_csv(self.path, comment="#")
        frame = frame[frame["state"] == M.COMPLETE].copy()
        for metric, count in ((M.ATTN_FLOPS, model_attention_flops), (M.ATTN_TILE_FLOPS, model_attention_tile_flops)):
            if metric in frame or frame.empty:
                continue
            # a table recorded before the metric was a column: counted from each row's configuration
            # at the length the table counted compute at (its header's; else the space's task's),
            # analytic, so the same figure a trial there reports
            frame[metric] = [
                float(count(space.make_config(_row_values(space, row)), seq_len=self.compute_len))
                for _, row in frame.iterrows()
            ]
        self.frame = frame
        self.rows: dict[tuple[Any, ...], dict[str, float]] = {}
        self.curves: dict[tuple[Any, ...], list[tuple[int, float]]] = {}
        for _, row in frame.iterrows():
            values = _row_values(space, row)
            key = table_key(space, values)
            self.rows[key] = {m: float(row[m]) for m in M.DIRECTIONS if m in row}
            final = [(int(row.get(M.STEPS, 0) or 0), float(row[M.ACCURACY]))]  # a table without curves
            self.curves[key] = _parse_curve(row.get("curve")) or final
        if not self.rows:
            raise ValueError(f"{self.path}: no complete trials to look up")
        self.space = space

    def __call__(self, config: AttentionConfig, values: Mapping[str, Any]) -> dict[str, float] | None:
        key = table_key(self.space, values)
        if key not in self.rows:
            raise KeyError(f"{self.path} has no row for {dict(k for k in key if k[1] is not None)}")
        return dict(self.rows[key])

    def curve(self, values: Mapping[str, Any]) -> list[tuple[int, float]]:
        """``(step, accuracy)`` at every rung of the row's training; the final point alone when the
        table was recorded without curves."""
        key = table_key(self.space, values)
        if key not in self.curves:
            raise KeyError(f"{self.path} has no row for {dict(k for k in key if k[1] is not None)}")
        return list(self.curves[key])

    def bounds(self, space: SearchSpace, metric: str, grids: list[list[Any]]) -> tuple[float, float]:
        col = self.frame[metric]
        return float(col.min()), float(col.max())

    def grids(self, space: SearchSpace, bins: int) -> list[list[Any]]:
        """The values recorded for each parameter (a pinned parameter has one)."""
        out = []
        for p in space.params:
            present = self.frame[p.name].dropna().unique().tolist() if p.name in self.frame else []
            if p.kind == "categorical":
                values = [c for c in p.choices if any(canonical(c) == canonical(v) for v in present)]
            else:
                values = sorted({canonical(v) for v in present})
                values = [int(v) for v in values] if p.kind == "int" else values
            out.append(values or [p.grid(1)[0]])
        return out


def _row_values(space: SearchSpace, row: pd.Series) -> dict[str, Any]:
    return {p.name: row[p.name] for p in space.params if p.name in row and not pd.isna(row[p.name])}


def recorded_task(path: str | Path) -> tuple[str, dict[str, Any]]:
    """The task (its family) and parameters a table was recorded on, from its first line."""
    with open(path) as fh:
        header = fh.readline()
    found = re.search(r"on task '(\w+)' (\{.*?\})", header)  # record.py's header
    if found is None:
        raise ValueError(f"{path}: its first line does not name the task it was recorded on")
    return found.group(1), ast.literal_eval(found.group(2))


def recorded_task_length(path: str | Path) -> int | None:
    """The sequence length a table was recorded at (``None``: its header does not say)."""
    try:
        family, params = recorded_task(path)
        return int(make_task(family, **params).seq_len)
    except (ValueError, OSError):
        return None


def recorded_compute_length(path: str | Path) -> int | None:
    """The sequence length a table's compute columns (``flops``, ``attn_flops``, ``attn_tile_flops``) count at: its
    header's ``compute at L=N`` (:mod:`attn_search.record` writes it), else its task's length
    (tables recorded before the header said so were recorded at their task's length), else
    ``None``."""
    try:
        with open(path) as fh:
            found = re.search(r"compute at L=(\d+)", fh.readline())
    except OSError:
        return None
    return int(found.group(1)) if found else recorded_task_length(path)


def _table_path(spec: str | Evaluator) -> str | Path | None:
    """The recorded table an evaluator spec (``table:PATH``, a :class:`TableEvaluator`) reads, if any."""
    if isinstance(spec, TableEvaluator):
        return spec.path
    return spec[len("table:") :] if isinstance(spec, str) and spec.startswith("table:") else None


def _counted_at(spec: str | Evaluator) -> int | None:
    """A table's compute length where it is not its task's (``None``: the task's, or no table)."""
    path = _table_path(spec)
    if path is None:
        return None
    counted = recorded_compute_length(path)
    return counted if counted != recorded_task_length(path) else None


def tiles_flat_at(space: SearchSpace, spec: str | Evaluator) -> int | None:
    """The length at which ``space``'s tile compute (``attn_tile_flops``) does not separate the
    configurations of a recorded table (``spec``): every row computes the same tiles there (every
    shipped table: one 128-tile at L=64 or 128, and the three causal tiles of L=256 for
    ``sparse-smoke.csv``); ``None`` where it separates them, or for another compute or evaluator."""
    path = _table_path(spec)
    if path is None or len(space.metrics) < 2 or space.metrics[1] != M.ATTN_TILE_FLOPS:
        return None
    try:
        table = spec if isinstance(spec, TableEvaluator) else TableEvaluator(path, space)
    except (OSError, ValueError):
        return None  # (a missing or empty table is refused where the search loads it)
    return table.compute_len if table.frame[M.ATTN_TILE_FLOPS].nunique() == 1 else None


def restrict_to_evaluator(space: SearchSpace, spec: str | Evaluator) -> SearchSpace:
    """The space with every parameter categorical over the values the evaluator knows (a recorded
    table's values), so that every proposal is one it can score, and the ``target_len`` the
    evaluator's compute was recorded at: a table's where its header says it counted compute at
    another length than its task's (``--target-len`` when it was recorded), else none."""
    space = dataclasses.replace(space, target_len=_counted_at(spec))
    grids = make_evaluator(spec, space).grids(space, 0)
    params = tuple(
        dataclasses.replace(p, kind="categorical", choices=tuple(g), low=None, high=None, log=False, step=None)
        for p, g in zip(space.params, grids, strict=True)
    )
    return dataclasses.replace(space, params=params)


def format_curve(curve: Sequence[Sequence[float]]) -> str:
    """``[(40, 0.25), (80, 0.5)]`` -> ``"40:0.25;80:0.5"``: a recorded table's ``curve`` cell."""
    return ";".join(f"{int(step)}:{float(acc):.6g}" for step, acc in curve)


def _parse_curve(text: Any) -> list[tuple[int, float]]:
    """Inverse of :func:`format_curve` (an empty or missing cell is an empty curve)."""
    if not isinstance(text, str) or not text.strip():
        return []
    return [(int(s), float(a)) for s, a in (item.split(":") for item in text.split(";"))]


def make_evaluator(spec: str | Evaluator, space: SearchSpace, **kwargs: Any) -> Evaluator:
    """``"training"``, ``"table:PATH"``, ``"module:callable"`` or an evaluator object.

    ``module:callable`` is a user's own evaluator (a surrogate model, a cache of earlier runs): the
    callable is called with the space and returns an object with the :class:`Evaluator` methods.
    """
    if not isinstance(spec, str):
        return spec
    if spec == "training":
        return TrainingEvaluator(space, **kwargs)
    if spec.startswith("table:"):
        return TableEvaluator(spec[len("table:") :], space)
    if ":" in spec and not spec.startswith(("/", ".")):
        module_name, _, attr = spec.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"evaluator {spec!r} cannot be imported: {exc}") from exc
        evaluator = factory(space)
        missing = [m for m in ("__call__", "bounds", "grids") if not callable(getattr(evaluator, m, None))]
        if missing:
            raise ValueError(
                f"evaluator {spec!r} returned {type(evaluator).__name__}, which lacks {', '.join(missing)}"
            )
        return evaluator  # type: ignore[no-any-return]
    raise ValueError(f"evaluator {spec!r} is unknown: use 'training', 'table:PATH' or 'module:callable'")
