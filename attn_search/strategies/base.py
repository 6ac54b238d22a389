"""The strategy interface: how the next configuration is chosen, in values.

A strategy answers :meth:`Strategy.ask` with the parameter values of its next proposal (or
``None`` when it has nothing to propose until results come back) and is told every finished
trial, whoever proposed it, as ``tell(values, outcome)``. It never sees the run's Optuna study:
the loop owns that study, the record of every trial, and turns each proposal into one of its
trials (:func:`ask_new`). So a strategy is written without Optuna, and one adapter
(:class:`~attn_search.strategies.samplers.SamplerStrategy`) wraps every Optuna sampler.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import optuna

from attn_search.engine import metrics as M
from attn_search.engine.config import PATTERN_FIELDS, simplest_equivalent
from attn_search.search.evaluators import canonical, table_key
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


@dataclasses.dataclass(frozen=True)
class Outcome:
    """How a trial ended, as the loop tells a strategy."""

    state: str
    """``complete``, ``pruned`` or ``failed``."""
    metrics: dict[str, float] | None = None
    """What the trial measured (accuracy, compute, ...), also for a pruned trial."""
    values: tuple[float, ...] | None = None
    """The objectives' values, when it completed."""
    constraints: dict[str, float] = dataclasses.field(default_factory=dict)
    """Constraint values (feasible at zero or less), where the search has constraints."""
    curve: tuple[tuple[int, float], ...] = ()
    """Held-out accuracy at each rung it reached."""
    duplicate_of: int | None = None
    """Set when the proposal repeated trial ``duplicate_of`` and was not run: the rest is that
    trial's outcome."""


class Strategy(Protocol):
    """Ask/tell proposer in values (see the module docstring)."""

    name: str
    """Recorded with every trial it proposed (``proposed_by``)."""

    def start(self, history: Sequence[tuple[dict[str, Any], Outcome]]) -> str | None:
        """Called once before the first ask with the trials a resumed search already finished;
        may return a line for the console."""

    def ask(self) -> dict[str, Any] | None:
        """The active parameter values of the next proposal, or ``None`` for now."""

    def tell(self, values: dict[str, Any], outcome: Outcome) -> None:
        """A trial with these values (proposed by anyone) ended with ``outcome``."""

    def close(self) -> None:
        """The search ended (or was interrupted): stop and save what must survive a resume."""


def proposer_of(strategy: Strategy) -> str:
    """Who proposed the last values ``strategy`` returned (``proposed_by``): its name, unless it
    says which of its parts did (:class:`FirstThese`)."""
    return str(getattr(strategy, "last_proposer", None) or strategy.name)


def match_key(values: dict[str, Any]) -> str:
    """A proposal's values as one string, the same however a store typed them (``8`` and ``8.0``):
    how a strategy finds, in what it is told, a proposal it made."""

    def same(v: Any) -> Any:
        v = canonical(v)
        return float(v) if isinstance(v, int) and not isinstance(v, bool) else v

    return repr(sorted((k, same(v)) for k, v in values.items()))


class FirstThese:
    """A :class:`Strategy` that proposes ``first`` (values), in order, then asks ``inner``; ``inner``
    is told every trial, those of ``first`` too. ``label``: recorded as their ``proposed_by``."""

    def __init__(self, inner: Strategy, first: Sequence[dict[str, Any]], *, name: str | None = None,
                 label: str | None = None) -> None:  # fmt: skip
        self.inner, self.queue = inner, [dict(v) for v in first]
        self.name = name or inner.name
        self.label = label or f"{self.name}-first"
        self.last_proposer: str | None = None

    def start(self, history: Sequence[tuple[dict[str, Any], Outcome]]) -> str | None:
        done = {match_key(v) for v, _ in history}
        self.queue = [v for v in self.queue if match_key(v) not in done]  # a resumed search ran them
        return self.inner.start(history)

    def ask(self) -> dict[str, Any] | None:
        if self.queue:
            self.last_proposer = self.label
            return self.queue.pop(0)
        values = self.inner.ask()
        self.last_proposer = proposer_of(self.inner) if values is not None else None
        return values

    def tell(self, values: dict[str, Any], outcome: Outcome) -> None:
        self.inner.tell(values, outcome)

    def close(self) -> None:
        self.inner.close()


def quiet(agent: Any) -> Any:
    """``agent`` (stable-baselines3) with a logger that writes nowhere. Without a logger of its own,
    every ``learn()`` makes an empty ``SB3-<date>`` folder in the temp directory (SB3's
    ``logger.configure`` with no folder does), one per meta-training and per RL search: a
    family-out run left over a thousand."""
    from stable_baselines3.common.logger import Logger

    agent.set_logger(Logger(folder=None, output_formats=[]))
    return agent


def trial_state(t: optuna.trial.FrozenTrial) -> str:
    """``complete``, ``pruned`` or ``failed``: a finished study trial's state in our words."""
    return {optuna.trial.TrialState.COMPLETE: M.COMPLETE, optuna.trial.TrialState.PRUNED: M.PRUNED}.get(
        t.state, M.FAILED
    )


def outcome_of(t: optuna.trial.FrozenTrial) -> Outcome:
    """A finished study trial's :class:`Outcome` (what a resumed strategy is told)."""
    return Outcome(trial_state(t), t.user_attrs.get("metrics"),
                   tuple(t.values) if t.state == optuna.trial.TrialState.COMPLETE else None,
                   dict(getattr(t, "constraints", None) or {}),
                   tuple((int(s), float(a)) for s, a in t.user_attrs.get("curve", [])))  # fmt: skip


def open_trial(study: optuna.Study, space: SearchSpace, values: dict[str, Any], proposed_by: str) -> optuna.Trial:
    """A new RUNNING trial of ``study`` holding ``values`` (the space's define-by-run ``suggest``
    records every parameter's distribution; nothing is sampled)."""
    study.enqueue_trial(values, user_attrs={"proposed_by": proposed_by}, skip_if_exists=False)
    trial = study.ask()
    space.suggest(trial)
    return trial


def ask_new(
    strategy: Strategy, study: optuna.Study, space: SearchSpace, seen: dict[tuple[Any, ...], int],
    key: Callable[[dict[str, Any]], tuple[Any, ...]] | None = None,
) -> optuna.Trial | None:  # fmt: skip
    """The strategy's next proposal that repeats no configuration in ``seen`` (key -> trial
    number), as a new RUNNING trial of ``study``.

    A proposal identical to a trial already run or running (same active values) is not run again:
    with the same seed it would give the same result. It is recorded in the study as failed with
    ``duplicate_of`` (left out of the tables and the trial count), the strategy is told the earlier
    trial's outcome, and the strategy is asked again, up to :data:`MAX_REASKS` times in a row; then
    the duplicate runs (the strategy insists, or the space is exhausted). The search loop and the
    table replay (:mod:`attn_search.replay`) both ask through here. Returns ``None`` when the
    strategy has nothing to propose until results come back. ``key``: what makes two proposals
    the same, from their active values (default :func:`table_key`; the search loop's also merges
    configurations whose masks are identical at the lengths that count, :func:`compute_key`).
    """
    same_as: Callable[[dict[str, Any]], tuple[Any, ...]] = key or (lambda values: table_key(space, values))
    for attempt in range(MAX_REASKS):
        proposal = strategy.ask()
        if proposal is None:
            return None
        trial = open_trial(study, space, proposal, proposer_of(strategy))
        same = same_as(space.active_values(dict(trial.params)))
        if same not in seen or attempt == MAX_REASKS - 1:
            if same in seen:  # the strategy insisted: it runs, and says what it repeats
                trial.set_user_attr("repeat_of", seen[same])
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
    told = outcome_of(earlier) if earlier.state.is_finished() else Outcome(M.FAILED)
    trial.set_user_attr("duplicate_of", original)
    trial.set_user_attr("reason", f"same configuration as trial {original}: not run again")
    study.tell(trial, state=optuna.trial.TrialState.FAIL)  # the run's record: not a trial of its own
    strategy.tell(space.active_values(dict(trial.params)), dataclasses.replace(told, duplicate_of=original))
