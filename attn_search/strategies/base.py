"""The strategy interface: how the next configuration is chosen, as ask and tell.

The search loop owns the run's Optuna study: it is the record of every trial, whichever strategy
proposed it. A strategy gives the study its sampler and answers :meth:`Strategy.ask` with a new
RUNNING trial of that study whose parameters are its proposal (or ``None`` when it has nothing to
propose until results come back); the loop tells it every finished trial.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import optuna

from attn_search.engine import metrics as M
from attn_search.engine.config import PATTERN_FIELDS, simplest_equivalent
from attn_search.search.evaluators import table_key
from attn_search.search.space import SearchSpace

MAX_REASKS = 20
"""Duplicate proposals in a row after which the duplicate runs anyway (see :func:`ask_new`)."""


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


def trial_state(t: optuna.trial.FrozenTrial) -> str:
    """``complete``, ``pruned`` or ``failed``: a finished study trial's state in our words."""
    return {optuna.trial.TrialState.COMPLETE: M.COMPLETE, optuna.trial.TrialState.PRUNED: M.PRUNED}.get(
        t.state, M.FAILED
    )


def ask_new(
    strategy: Strategy, study: optuna.Study, space: SearchSpace, seen: dict[tuple[Any, ...], int],
    key: Callable[[dict[str, Any]], tuple[Any, ...]] | None = None,
) -> optuna.Trial | None:  # fmt: skip
    """The strategy's next proposal that repeats no configuration in ``seen`` (key -> trial number).

    A proposal identical to a trial already run or running (same active values) is not run again:
    with the same seed it would give the same result. It is told to the study as failed with
    ``duplicate_of`` (left out of the tables and the trial count), the strategy is told the earlier
    trial's result, and the strategy is asked again, up to :data:`MAX_REASKS` times in a row; then
    the duplicate runs (the strategy insists, or the space is exhausted). The search loop and the
    table replay (:mod:`attn_search.replay`) both ask through here. Returns ``None`` when the
    strategy has nothing to propose until results come back. ``key``: what makes two proposals
    the same, from their active values (default :func:`table_key`; the search loop's also merges
    configurations whose masks are identical at the lengths that count, :func:`compute_key`).
    """
    same_as: Callable[[dict[str, Any]], tuple[Any, ...]] = key or (lambda values: table_key(space, values))
    for attempt in range(MAX_REASKS):
        trial = strategy.ask(study)
        if trial is None:
            return None
        same = same_as(space.active_values(dict(trial.params)))
        if same not in seen or attempt == MAX_REASKS - 1:
            seen.setdefault(same, trial.number)
            return trial
        _answer_duplicate(strategy, study, space, trial, seen[same])
    return None  # not reached: the last attempt returns


def compute_key(space: SearchSpace, values: dict[str, Any], lengths: Sequence[int]) -> tuple[Any, ...]:
    """:func:`table_key`, except that a configuration whose pattern computes dense attention at
    every length in ``lengths`` (the task's, and the target length where one is set) is keyed as
    dense: the two train the same model and cost the same there, so they are one trial."""
    try:
        config = space.make_config(values, seed=0)
    except ValueError:
        return table_key(space, values)
    if config.pattern != "dense" and simplest_equivalent(config, lengths) is None:
        return table_key(space, values)
    fields = {"pattern", *PATTERN_FIELDS}
    return (*((n, v) for n, v in table_key(space, values) if n not in fields), ("pattern", "dense"))


def _answer_duplicate(
    strategy: Strategy, study: optuna.Study, space: SearchSpace, trial: optuna.Trial, original: int
) -> None:
    earlier = study.get_trials(deepcopy=False)[original]  # numbers are list positions
    state = trial_state(earlier) if earlier.state.is_finished() else M.FAILED
    metrics = earlier.user_attrs.get("metrics") if earlier.state.is_finished() else None
    trial.set_user_attr("duplicate_of", original)
    trial.set_user_attr("reason", f"same configuration as trial {original}: not run again")
    if getattr(strategy, "duplicates_as_observations", False) and earlier.state == optuna.trial.TrialState.COMPLETE:
        # a sampler whose proposal is fixed by its data (GP) learns from the repeat: less
        # uncertainty there moves its next proposal elsewhere
        study.tell(trial, list(earlier.values))
    else:  # samplers that draw at random are simply asked again
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
    strategy.tell(trial.number, space.active_values(dict(trial.params)), state, metrics)
