"""Multi-objective successive halving (MO-ASHA), independent of Optuna and Ray.

Optuna's pruners compare one intermediate value per trial, so they cannot weigh accuracy against
compute. MO-ASHA (Schmucker et al. 2021, arXiv:2106.12639, asynchronous successive halving with a
Pareto ranking): at each rung, a trial continues only if it ranks in the top ``1/eta`` of the
trials that reached that rung, ranked by non-dominated sorting of (accuracy at the rung, compute).
Trials tied on the cut-off front all continue, so a trial on the first front is never stopped.
Until ``min_trials`` trials have reached a rung nobody is stopped there (too little evidence), and
no trial is stopped before ``grace_period`` steps (ASHA's grace period: small models learn
associative recall in a sudden jump, so accuracy early in training says little about the end).

The rule only sees numbers: a backend calls :meth:`MOASHA.report` from its reporter, and the
Optuna objective and the Ray Tune scheduler wrap the same object.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from collections.abc import Hashable, Sequence

import numpy as np

from attn_search.engine.metrics import MAXIMIZE
from attn_search.search.pareto import non_dominated_ranks


@dataclasses.dataclass
class MOASHA:
    """The rule's state: objective vectors of every trial at every rung.

    Args:
        directions: direction of each objective (accuracy first, then compute).
        eta: keep the top ``1/eta`` at each rung.
        min_trials: decide at a rung only once this many trials reached it (default ``eta``).
        grace_period: never stop a trial at a rung below this step.
    """

    directions: Sequence[str]
    eta: float = 3.0
    min_trials: int | None = None
    grace_period: int = 0
    rungs: dict[int, dict[Hashable, tuple[float, ...]]] = dataclasses.field(default_factory=dict)
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.eta <= 1:
            raise ValueError(f"eta={self.eta} is invalid: it must be > 1")

    def record(self, trial: Hashable, step: int, values: Sequence[float]) -> None:
        """Remember ``values`` of ``trial`` at rung ``step`` without deciding (used on resume)."""
        with self._lock:
            self.rungs.setdefault(step, {})[trial] = tuple(float(v) for v in values)

    def report(self, trial: Hashable, step: int, values: Sequence[float]) -> bool:
        """Record ``values`` of ``trial`` at rung ``step``; return ``True`` if it should continue."""
        self.record(trial, step, values)
        if step < self.grace_period:
            return True
        with self._lock:
            at_rung = self.rungs[step]
            needed = self.min_trials if self.min_trials is not None else math.ceil(self.eta)
            if len(at_rung) < max(1, needed):
                return True
            ids = list(at_rung)
            points = np.array([at_rung[i] for i in ids])
        return self._keeps(ids.index(trial), points)

    def _keeps(self, index: int, points: np.ndarray) -> bool:
        # NaN accuracy (a diverged trial) ranks last
        points = points.copy()
        points[np.isnan(points)] = -np.inf if self.directions[0] == MAXIMIZE else np.inf
        ranks = non_dominated_ranks(points, self.directions)
        keep = max(1, math.ceil(len(points) / self.eta))
        cutoff = np.sort(ranks)[keep - 1]
        return bool(ranks[index] <= cutoff)
