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
``Box(0, 1, shape=(k + m + 3 + 2 * B,), float32)`` with ``B`` the total number of bins over all
action dimensions (``sum(action_space.nvec)``):

| index | meaning |
|---|---|
| ``0 .. k-1`` | the last action, each dimension divided by its largest bin index |
| ``k .. k+m-1`` | the last trial's objectives, normalised (accuracy as is; compute between the bounds) |
| ``k+m`` | normalised hypervolume of the running Pareto front |
| ``k+m+1`` | remaining budget (fraction of trials left) |
| ``k+m+2`` | 1 if the last trial completed, 0 if it failed (or none ran yet) |
| next ``B`` | the episode's history, per dimension and bin: trials that chose it, as a fraction of the budget |
| last ``B`` | per dimension and bin: the best accuracy of those trials relative to the episode's best (0: none) |

The history makes the search so far visible to a memoryless policy (what was tried, which values
led to the best results), in terms that transfer across tasks: counts and relative accuracies,
no task identity. (Before the history was added the observation had ``k + m + 3`` entries, so an
agent saved then does not load into this env.)

## Rewards
The increase of the running front's normalised hypervolume (accuracy in [0, 1], compute
normalised with fixed bounds, reference at the worst corner), so an episode's return is its final
normalised hypervolume, times ``reward_scale`` (1 by default; meta-training divides by a table's
best hypervolume so that every task weighs alike).

## Starting State
An empty front, all-zero last action and metrics, full budget.

## Episode End
``terminated`` once ``budget`` trials have been evaluated; never truncated by the env itself.

## Arguments
``space`` (name or YAML path), ``evaluator`` (``"training"``, ``"table:PATH"`` or an
:class:`Evaluator`), ``budget`` (trials per episode), ``bins`` (values per numeric parameter),
``compute`` (``flops``, ``attn_flops``, ``attn_tile_flops``, ``latency``, ``memory``, ``params``; default: the space's
own compute objective, ``flops`` for a space of accuracy alone; ``attn_flops`` for the sparse space's tiles on a
table whose rows all compute the same tiles, as the shipped tables' do), ``preset`` (per-trial training
budget of the ``training`` evaluator), ``device``, ``reward_scale``.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

from attn_search.search.evaluators import Evaluator, decode, make_evaluator, tiles_flat_at
from attn_search.search.pareto import normalized_hypervolume
from attn_search.search.space import SearchSpace, load_space


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
        compute: str | None = None,
        preset: str = "smoke",
        device: str = "auto",
        reward_scale: float = 1.0,
    ) -> None:
        super().__init__()
        if budget < 1:
            raise ValueError(f"budget={budget} is invalid: an episode needs at least one trial")
        base = space if isinstance(space, SearchSpace) else load_space(space)
        self.space = base.with_compute(compute or base.own_compute() or "flops")
        if compute is None and tiles_flat_at(self.space, evaluator) is not None:
            self.space = base.with_compute("attn_flops")  # (a table whose rows all compute the same tiles, as a search)
        kwargs = {"preset": preset, "device": device} if evaluator == "training" else {}
        self.evaluator = make_evaluator(evaluator, self.space, **kwargs)
        self.grids = self.evaluator.grids(self.space, bins)
        self.budget = budget
        self.reward_scale = reward_scale
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
        self._offsets = np.concatenate([[0], np.cumsum(self._nvec)[:-1]]).astype(np.int64)  # first bin of each dim
        self._n_obs = k + m + 3 + 2 * int(self._nvec.sum())
        self.observation_space = gym.spaces.Box(0.0, 1.0, shape=(self._n_obs,), dtype=np.float32)
        self._points: list[list[float]] = []
        self._used = 0
        self._hv = 0.0
        self._tried = np.zeros(int(self._nvec.sum()), dtype=np.float64)  # trials per (dimension, bin)
        self._best = np.zeros(int(self._nvec.sum()), dtype=np.float64)  # best accuracy per (dimension, bin)
        self._obs = np.zeros(self._n_obs, dtype=np.float32)

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
        self._tried[:] = 0.0
        self._best[:] = 0.0
        self._obs = np.zeros(self._n_obs, dtype=np.float32)
        self._obs[len(self.grids) + len(self.metrics) + 1] = 1.0  # the whole budget is left
        return self._obs.copy(), {}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        action = np.asarray(action, dtype=np.int64)
        values = decode(self.space, self.grids, action)
        config = self.space.make_config(values)
        metrics = self.evaluator(config, values)
        self._used += 1
        k, m = len(self.grids), len(self.metrics)
        obs = np.zeros(self._n_obs, dtype=np.float32)
        obs[:k] = action / np.maximum(1, self._nvec - 1)
        chosen = self._offsets + action  # this trial's bin in every dimension
        self._tried[chosen] += 1
        if metrics is not None:
            point = [metrics[name] for name in self.metrics]
            self._points.append(point)
            obs[k : k + m] = self._normalise(point)
            obs[k + m + 2] = 1.0
            self._best[chosen] = np.maximum(self._best[chosen], float(np.clip(point[0], 0.0, 1.0)))
        hv = (
            normalized_hypervolume(self._points, self.directions, lower=self.lower, upper=self.upper)
            if self._points
            else 0.0
        )
        reward = hv - self._hv
        self._hv = hv
        obs[k + m] = hv
        obs[k + m + 1] = 1.0 - self._used / self.budget
        n_bins = len(self._tried)
        obs[k + m + 3 : k + m + 3 + n_bins] = np.minimum(1.0, self._tried / self.budget)
        top = self._best.max()
        obs[k + m + 3 + n_bins :] = self._best / top if top > 0 else 0.0
        self._obs = obs
        terminated = self._used >= self.budget
        info = {"config": config.to_dict(), "values": values, "metrics": metrics, "hypervolume": hv}
        return obs.copy(), float(reward * self.reward_scale), terminated, False, info
