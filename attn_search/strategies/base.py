"""The strategy interface: how the next configuration is chosen, as ask and tell.

The search loop owns the run's Optuna study: it is the record of every trial, whichever strategy
proposed it. A strategy gives the study its sampler and answers :meth:`Strategy.ask` with a new
RUNNING trial of that study whose parameters are its proposal (or ``None`` when it has nothing to
propose until results come back); the loop tells it every finished trial.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Protocol

import optuna

from attn_search.space import SearchSpace


@dataclasses.dataclass(frozen=True)
class StrategyContext:
    """What a strategy may know about the search it serves."""

    space: SearchSpace
    seed: int
    trials: int
    """The search's trial budget."""
    slots: int
    """Trials the backend runs at once (proposals the strategy should have out at a time)."""
    run_dir: Path
    resume: bool
    evaluator: str = "training"
    """``training``, ``table:PATH`` or ``module:callable`` (the agent's action grid follows a table's values)."""
    compute: str = "flops"
    task: str | None = None
    """The task actually searched (``None``: the space's)."""
    task_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Strategy-specific options (``pretrain``, ``pretrain_steps``, ``agent``)."""


class Strategy(Protocol):
    """Ask/tell proposer (see the module docstring)."""

    name: str

    def sampler(self) -> optuna.samplers.BaseSampler:
        """The sampler the study is created with."""

    def start(self, study: optuna.Study) -> str | None:
        """Called once the study exists (and holds any earlier trials, on resume); may return a
        line for the console."""

    def ask(self, study: optuna.Study) -> optuna.Trial | None:
        """A new RUNNING trial of ``study`` holding the next proposal, or ``None`` for now."""

    def tell(self, number: int, values: dict[str, Any], state: str, metrics: dict[str, float] | None) -> None:
        """Trial ``number`` (proposed by anyone) ended in ``state`` with ``metrics``."""

    def close(self) -> None:
        """The search ended (or was interrupted): stop and save what must survive a resume."""
