"""Optuna samplers by name, as a strategy (:class:`SamplerStrategy`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import optuna

from attn_search.engine import metrics as M
from attn_search.strategies.base import Outcome, StrategyContext, match_key

OPTUNA_STRATEGIES = ("tpe", "nsga2", "gp", "random", "qmc", "cmaes")
SINGLE_OBJECTIVE_ONLY = ("cmaes",)


def make_sampler(
    name: str,
    *,
    seed: int | None,
    n_objectives: int,
    n_trials: int,
    constrained: bool = False,
) -> optuna.samplers.BaseSampler:
    """An Optuna sampler for ``name`` (one of :data:`OPTUNA_STRATEGIES`).

    Choices made for budgets of tens of trials: TPE and GP start modelling after
    ``min(10, n_trials // 3)`` random trials; NSGA-II's population is ``n_trials // 3`` (2 to 50)
    so that at least a few generations evolve. Raises ``ValueError`` for an unknown name or a
    single-objective sampler asked for several objectives. ``constrained``: the search has
    constraints (set on each trial with Optuna's ``Trial.set_constraint``), which only TPE,
    NSGA-II and GP take into account. TPE uses the constant liar for trials still running, so that
    several proposals out at once (Ray, populations) do not pile onto one point.
    """
    if name not in OPTUNA_STRATEGIES:
        raise ValueError(f"strategy {name!r} is unknown: use one of {', '.join(OPTUNA_STRATEGIES)}")
    if name in SINGLE_OBJECTIVE_ONLY and n_objectives > 1:
        raise ValueError(
            f"strategy {name!r} optimises a single objective but the search has {n_objectives}: "
            "add --compute none, or use tpe, nsga2, gp, random or qmc"
        )
    if constrained and name not in ("tpe", "nsga2", "gp"):
        raise ValueError(f"strategy {name!r} cannot honour --max-flops/--max-latency-ms: use tpe, nsga2 or gp")
    startup = max(2, min(10, n_trials // 3))
    kwargs: dict[str, Any] = {"seed": seed}
    if name == "tpe":
        # multivariate + group: model parameters jointly, per conditional sub-space (the pattern's
        # own parameters exist only for that pattern)
        return optuna.samplers.TPESampler(
            multivariate=True, group=True, n_startup_trials=startup, constant_liar=True, **kwargs
        )
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(population_size=max(2, min(50, n_trials // 3)), **kwargs)
    if name == "gp":
        return optuna.samplers.GPSampler(n_startup_trials=startup, **kwargs)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "qmc":
        return optuna.samplers.QMCSampler(seed=seed, scramble=True)
    return optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=startup)


class SamplerStrategy:
    """Any Optuna sampler as a strategy in values: the one adapter.

    The sampler proposes in a study of its own, in memory, that mirrors the search's trials (Ray
    Tune's ``OptunaSearch`` wraps Optuna the same way): :meth:`ask` asks that study and runs the
    space's define-by-run ``suggest`` on the trial (so conditional parameters work), and
    :meth:`tell` closes the trial it proposed with these values, or records a trial proposed by
    someone else (an enqueued or resumed trial) through the same ``ask``, so the sampler's own
    bookkeeping (NSGA-II's generations, TPE's constant liar for trials still out) sees every trial.
    """

    def __init__(self, name: str, context: StrategyContext, *, constrained: bool = False) -> None:
        self.name = name
        # GP's proposal is a deterministic optimum of its acquisition: told a repeated proposal as a
        # repeated observation, it moves on; the others draw at random and are simply asked again
        self.duplicates_as_observations = name == "gp"
        self.space = context.space
        self._sampler = make_sampler(
            name, seed=context.seed, n_objectives=len(context.space.objectives), n_trials=context.trials,
            constrained=constrained,
        )  # fmt: skip
        level = optuna.logging.get_verbosity()  # (Optuna announces every new study at INFO: this one is ours)
        optuna.logging.set_verbosity(max(level, optuna.logging.WARNING))
        try:
            self.study = optuna.create_study(directions=self.space.directions, sampler=self._sampler)  # type: ignore[arg-type]
        finally:
            optuna.logging.set_verbosity(level)
        self._out: dict[str, list[optuna.Trial]] = {}  # proposals not yet told, by their values

    def start(self, history: Sequence[tuple[dict[str, Any], Outcome]]) -> str | None:
        for values, outcome in history:
            self.tell(values, outcome)
        return None

    def ask(self) -> dict[str, Any]:
        trial = self.study.ask()
        values = self.space.active_values(self.space.suggest(trial))
        self._out.setdefault(match_key(values), []).append(trial)
        return values

    def tell(self, values: dict[str, Any], outcome: Outcome) -> None:
        mine = self._out.get(match_key(values))
        if mine:
            trial = mine.pop(0)
        else:  # not proposed here: recorded as the sampler would have seen it in one shared study
            self.study.enqueue_trial(values, skip_if_exists=False)
            trial = self.study.ask()
            self.space.suggest(trial)
        for key, value in outcome.constraints.items():
            trial.set_constraint(key, value)
        if outcome.values is not None and (outcome.duplicate_of is None or self.duplicates_as_observations):
            self.study.tell(trial, list(outcome.values))
        elif outcome.state == M.PRUNED and outcome.duplicate_of is None:
            if len(self.space.objectives) == 1:  # (Optuna keeps intermediate values of one objective only)
                for step, accuracy in outcome.curve:
                    trial.report(accuracy, step)
            self.study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        else:
            self.study.tell(trial, state=optuna.trial.TrialState.FAIL)

    def close(self) -> None:
        pass
