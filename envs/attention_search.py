"""``attn_search/AttentionSearch-v0``: propose attention configurations, get them trained (or looked
up), and be rewarded for improving the accuracy/compute Pareto front.

## Description
Each step proposes one configuration of a search space (any YAML space). An evaluator scores it:
``training`` trains the small attention model for real through :func:`attn_search.evaluate`;
``table`` looks the configuration up in a recorded trials table (``attn-search record``). The
episode is a search with a fixed budget of trials.

## Action Space
``MultiDiscrete([n_1, ..., n_k])``, one dimension per searched parameter, in the space's order.
With the ``training`` evaluator a categorical parameter has one bin per choice and an
``int``/``float`` parameter has ``bins`` values evenly spaced between ``low`` and ``high``
(log-spaced when the space says ``log``; ints rounded and de-duplicated). With the ``table``
evaluator each dimension selects among the values recorded in the table (a parameter pinned when
recording has a single bin). A dimension whose parameter is inactive under the chosen values (a
``when`` condition fails) is ignored.

## Observation Space
``Box(0, 1, shape=(k + m + 3,), float32)``:

| index | meaning |
|---|---|
| ``0 .. k-1`` | the last action, each dimension divided by its largest bin index |
| ``k .. k+m-1`` | the last trial's objectives, normalised (accuracy as is; compute between the bounds) |
| ``k+m`` | normalised hypervolume of the running Pareto front |
| ``k+m+1`` | remaining budget (fraction of trials left) |
| ``k+m+2`` | 1 if the last trial completed, 0 if it failed (or none ran yet) |

## Rewards
The increase of the running front's normalised hypervolume (accuracy in [0, 1], compute
normalised with fixed bounds, reference at the worst corner), so an episode's return is its final
normalised hypervolume.

## Starting State
An empty front, all-zero last action and metrics, full budget.

## Episode End
``terminated`` once ``budget`` trials have been evaluated; never truncated by the env itself.

## Arguments
``space`` (name or YAML path), ``evaluator`` (``"training"``, ``"table:PATH"`` or an
:class:`Evaluator`), ``budget`` (trials per episode), ``bins`` (values per numeric parameter),
``compute`` (``flops``, ``latency``, ``memory``, ``params``), ``preset`` (per-trial training
budget of the ``training`` evaluator), ``device``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import gymnasium as gym
import numpy as np
import pandas as pd

from attn_search import metrics as M
from attn_search.config import AttentionConfig
from attn_search.cost import model_flops
from attn_search.pareto import normalized_hypervolume
from attn_search.space import SearchSpace, load_space
from attn_search.tasks import make_task
from attn_search.trainer import evaluate


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
    return tuple((p.name, _canon(active.get(p.name))) for p in space.params)


def _canon(value: Any) -> Any:
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

    def __init__(self, space: SearchSpace, *, preset: str = "smoke", device: str = "auto") -> None:
        self.task = space.task
        self.task_kwargs = dict(space.task_params)
        self.preset = preset
        self.device = device

    def __call__(self, config: AttentionConfig, values: Mapping[str, Any]) -> dict[str, float] | None:
        result = evaluate(config, self.task, budget=self.preset, device=self.device, task_kwargs=self.task_kwargs)
        return result.metrics if result.state == M.COMPLETE else None

    def grids(self, space: SearchSpace, bins: int) -> list[list[Any]]:
        return grids_of(space, bins)

    def bounds(self, space: SearchSpace, metric: str, grids: list[list[Any]]) -> tuple[float, float]:
        if metric not in (M.FLOPS, M.PARAMS):
            raise ValueError(f"the training evaluator knows bounds for flops and params only, not {metric}")
        task = make_task(self.task, **self.task_kwargs)
        rng = np.random.default_rng(0)
        values = []
        for _ in range(256):  # analytic, so a sample of the grid gives the range cheaply
            action = np.array([rng.integers(len(g)) for g in grids])
            config = space.make_config(decode(space, grids, action))
            if metric == M.FLOPS:
                values.append(model_flops(config, seq_len=task.seq_len, n_classes=task.n_classes))
            else:
                d, L = config.d_model, config.n_layers
                values.append(2 * task.vocab_size * d + L * 12 * d * d + d * task.n_classes)
        return float(min(values)), float(max(values))


class TableEvaluator:
    """Looks configurations up in a recorded trials table (``attn-search record``).

    The table holds one row per configuration of the space discretised with the same ``bins``,
    with the columns of ``trials.csv``. A configuration that is not in the table is an error
    naming it (record the table with the env's ``bins``).
    """

    def __init__(self, path: str | Path, space: SearchSpace) -> None:
        self.path = Path(path)
        frame = pd.read_csv(self.path, comment="#")
        frame = frame[frame["state"] == M.COMPLETE]
        self.frame = frame
        self.rows: dict[tuple[Any, ...], dict[str, float]] = {}
        for _, row in frame.iterrows():
            values = {p.name: row[p.name] for p in space.params if p.name in row and not pd.isna(row[p.name])}
            self.rows[table_key(space, values)] = {m: float(row[m]) for m in M.DIRECTIONS if m in row}
        if not self.rows:
            raise ValueError(f"{self.path}: no complete trials to look up")
        self.space = space

    def __call__(self, config: AttentionConfig, values: Mapping[str, Any]) -> dict[str, float] | None:
        key = table_key(self.space, values)
        if key not in self.rows:
            raise KeyError(f"{self.path} has no row for {dict(k for k in key if k[1] is not None)}")
        return dict(self.rows[key])

    def bounds(self, space: SearchSpace, metric: str, grids: list[list[Any]]) -> tuple[float, float]:
        col = self.frame[metric]
        return float(col.min()), float(col.max())

    def grids(self, space: SearchSpace, bins: int) -> list[list[Any]]:
        """The values recorded for each parameter (a pinned parameter has one)."""
        out = []
        for p in space.params:
            present = self.frame[p.name].dropna().unique().tolist() if p.name in self.frame else []
            if p.kind == "categorical":
                values = [c for c in p.choices if any(_canon(c) == _canon(v) for v in present)]
            else:
                values = sorted({_canon(v) for v in present})
                values = [int(v) for v in values] if p.kind == "int" else values
            out.append(values or [p.grid(1)[0]])
        return out


def make_evaluator(spec: str | Evaluator, space: SearchSpace, **kwargs: Any) -> Evaluator:
    """``"training"``, ``"table:PATH"`` or an evaluator object."""
    if not isinstance(spec, str):
        return spec
    if spec == "training":
        return TrainingEvaluator(space, **kwargs)
    if spec.startswith("table:"):
        return TableEvaluator(spec[len("table:") :], space)
    raise ValueError(f"evaluator {spec!r} is unknown: use 'training' or 'table:PATH'")


class AttentionSearchEnv(gym.Env[np.ndarray, np.ndarray]):
    """See the module docstring (Gymnasium's sections)."""

    metadata: dict[str, Any] = {"render_modes": []}  # noqa: RUF012  (gymnasium declares it an instance attribute)

    def __init__(
        self,
        space: str | SearchSpace = "sparse",
        evaluator: str | Evaluator = "training",
        *,
        budget: int = 20,
        bins: int = 5,
        compute: str = "flops",
        preset: str = "smoke",
        device: str = "auto",
    ) -> None:
        super().__init__()
        if budget < 1:
            raise ValueError(f"budget={budget} is invalid: an episode needs at least one trial")
        base = space if isinstance(space, SearchSpace) else load_space(space)
        self.space = base.with_compute(compute)
        kwargs = {"preset": preset, "device": device} if evaluator == "training" else {}
        self.evaluator = make_evaluator(evaluator, self.space, **kwargs)
        self.grids = self.evaluator.grids(self.space, bins)
        self.budget = budget
        self.metrics = self.space.metrics
        self.directions = self.space.directions
        lo, hi = [0.0], [1.0]
        for metric in self.metrics[1:]:
            best, worst = self.evaluator.bounds(self.space, metric, self.grids)
            lo.append(best)
            hi.append(worst)
        self.lower, self.upper = lo, hi
        k, m = len(self.grids), len(self.metrics)
        self._nvec = np.array([len(g) for g in self.grids], dtype=np.int64)
        self.action_space = gym.spaces.MultiDiscrete(self._nvec)
        self.observation_space = gym.spaces.Box(0.0, 1.0, shape=(k + m + 3,), dtype=np.float32)
        self._points: list[list[float]] = []
        self._used = 0
        self._hv = 0.0
        self._obs = np.zeros(k + m + 3, dtype=np.float32)

    def _normalise(self, values: list[float]) -> list[float]:
        out = []
        for v, lo, hi in zip(values, self.lower, self.upper, strict=True):
            out.append(float(np.clip((v - lo) / (hi - lo), 0.0, 1.0)) if hi > lo else 0.0)
        return out

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        self._points = []
        self._used = 0
        self._hv = 0.0
        self._obs = np.zeros(self.observation_space.shape, dtype=np.float32)  # type: ignore[arg-type]
        self._obs[-2] = 1.0
        return self._obs.copy(), {}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        action = np.asarray(action, dtype=np.int64)
        values = decode(self.space, self.grids, action)
        config = self.space.make_config(values)
        metrics = self.evaluator(config, values)
        self._used += 1
        k, m = len(self.grids), len(self.metrics)
        obs = np.zeros(k + m + 3, dtype=np.float32)
        obs[:k] = action / np.maximum(1, self._nvec - 1)
        if metrics is not None:
            point = [metrics[name] for name in self.metrics]
            self._points.append(point)
            obs[k : k + m] = self._normalise(point)
            obs[-1] = 1.0
        hv = (
            normalized_hypervolume(self._points, self.directions, lower=self.lower, upper=self.upper)
            if self._points
            else 0.0
        )
        reward = hv - self._hv
        self._hv = hv
        obs[k + m] = hv
        obs[k + m + 1] = 1.0 - self._used / self.budget
        self._obs = obs
        terminated = self._used >= self.budget
        info = {"config": config.to_dict(), "values": values, "metrics": metrics, "hypervolume": hv}
        return obs.copy(), float(reward), terminated, False, info
