"""Optuna samplers by name, as a strategy (:class:`SamplerStrategy`)."""

from __future__ import annotations

from typing import Any

import optuna

from attn_search.strategies.base import StrategyContext

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
    """An Optuna sampler proposing through the study itself (``study.ask`` then the space's
    define-by-run ``suggest``, so conditional parameters work)."""

    def __init__(self, name: str, context: StrategyContext, *, constrained: bool = False) -> None:
        self.name = name
        # GP's proposal is a deterministic optimum of its acquisition: told a repeated proposal as a
        # repeated observation, it moves on; the others draw at random and are simply asked again
        self.duplicates_as_observations = name == "gp"
        self.context = context
        self._sampler = make_sampler(
            name, seed=context.seed, n_objectives=len(context.space.objectives), n_trials=context.trials,
            constrained=constrained,
        )  # fmt: skip

    def sampler(self) -> optuna.samplers.BaseSampler:
        return self._sampler

    def start(self, study: optuna.Study) -> str | None:
        return None

    def ask(self, study: optuna.Study) -> optuna.Trial:
        trial = study.ask()
        self.context.space.suggest(trial)
        return trial

    def tell(self, number: int, values: dict[str, Any], state: str, metrics: dict[str, float] | None) -> None:
        pass  # the sampler reads the study, where the loop recorded the trial

    def close(self) -> None:
        pass
