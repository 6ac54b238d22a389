"""Strategies: how the next configuration is chosen. Here, Optuna samplers by name."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import optuna

OPTUNA_STRATEGIES = ("tpe", "nsga2", "gp", "random", "qmc", "cmaes")
SINGLE_OBJECTIVE_ONLY = ("cmaes",)

ConstraintsFunc = Callable[[optuna.trial.FrozenTrial], Sequence[float]]


def make_sampler(
    name: str,
    *,
    seed: int | None,
    n_objectives: int,
    n_trials: int,
    constraints_func: ConstraintsFunc | None = None,
) -> optuna.samplers.BaseSampler:
    """An Optuna sampler for ``name`` (one of :data:`OPTUNA_STRATEGIES`).

    Choices made for budgets of tens of trials: TPE and GP start modelling after
    ``min(10, n_trials // 3)`` random trials; NSGA-II's population is ``n_trials // 3`` (2 to 50)
    so that at least a few generations evolve. Raises ``ValueError`` for an unknown name or a
    single-objective sampler asked for several objectives.
    """
    if name not in OPTUNA_STRATEGIES:
        raise ValueError(f"strategy {name!r} is unknown: use one of {', '.join(OPTUNA_STRATEGIES)}")
    if name in SINGLE_OBJECTIVE_ONLY and n_objectives > 1:
        raise ValueError(
            f"strategy {name!r} optimises a single objective but the search has {n_objectives}: "
            "add --compute none, or use tpe, nsga2, gp, random or qmc"
        )
    if constraints_func is not None and name not in ("tpe", "nsga2", "gp"):
        raise ValueError(f"strategy {name!r} cannot honour --max-flops/--max-latency-ms: use tpe, nsga2 or gp")
    startup = max(2, min(10, n_trials // 3))
    kwargs: dict[str, Any] = {"seed": seed}
    if constraints_func is not None:
        kwargs["constraints_func"] = constraints_func
    if name == "tpe":
        # multivariate + group: model parameters jointly, per conditional sub-space (the pattern's
        # own parameters exist only for that pattern)
        return optuna.samplers.TPESampler(multivariate=True, group=True, n_startup_trials=startup, **kwargs)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(population_size=max(2, min(50, n_trials // 3)), **kwargs)
    if name == "gp":
        return optuna.samplers.GPSampler(n_startup_trials=startup, **kwargs)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "qmc":
        return optuna.samplers.QMCSampler(seed=seed, scramble=True)
    return optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=startup)
