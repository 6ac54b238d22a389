"""The RL strategy: a stable-baselines3 agent (PPO or A2C) acting in ``AttentionSearchEnv``.

The agent proposes configurations; each proposal is evaluated as a trial of the run's own Optuna
study (enqueued with the agent's values, then run by the same objective), so its trials land in
the same storage, ``trials.csv``, front and report as any sampler's. An episode is ``episode``
trials; the agent learns across episodes for the whole search.

Hyperparameters fit budgets of tens to hundreds of trials (SB3's defaults, 2048 steps per update,
would never update): one update per episode (``n_steps = episode``), a small MLP, a larger
learning rate and some entropy bonus to keep exploring. ``pretrain`` first trains the agent on a
recorded table (fast, no training), after which the real search uses the table's grid so the
action spaces match.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from attn_search import metrics as M
from attn_search.config import AttentionConfig
from attn_search.envs.attention_search import AttentionSearchEnv, TableEvaluator, TrainingEvaluator
from attn_search.space import SearchSpace

RL_STRATEGIES = ("ppo", "a2c")
RunBatch = Callable[[list[dict[str, Any]]], list[Mapping[str, float] | None]]
"""Evaluates proposals concurrently (the Ray backend); ``None`` for a proposal that gave no result."""
EPISODE = 10


class BudgetReached(Exception):
    """Raised by a trial runner when the search's trial or time budget is spent; ends learning."""


def agent_kwargs(name: str, *, episode: int, seed: int | None) -> dict[str, Any]:
    """SB3 hyperparameters for search budgets of tens to hundreds of trials."""
    common: dict[str, Any] = {"seed": seed, "verbose": 0, "device": "cpu", "gamma": 0.9,
                              "policy_kwargs": {"net_arch": [64, 64]}}  # fmt: skip
    if name == "ppo":
        return {**common, "n_steps": episode, "batch_size": episode, "n_epochs": 10, "learning_rate": 3e-3,
                "ent_coef": 0.01}  # fmt: skip
    if name == "a2c":
        return {**common, "n_steps": episode, "learning_rate": 3e-3, "ent_coef": 0.01}
    raise ValueError(f"RL strategy {name!r} is unknown: use one of {', '.join(RL_STRATEGIES)}")


def make_agent(
    name: str, env: Any, *, episode: int = EPISODE, seed: int | None = None, path: str | Path | None = None
) -> Any:
    """A new agent, or one loaded from an SB3 ``.zip`` (``path``) and attached to ``env``."""
    from stable_baselines3 import A2C, PPO

    cls = PPO if name == "ppo" else A2C
    if path is not None and Path(path).is_file():
        return cls.load(str(path), env=env, device="cpu")
    return cls("MlpPolicy", env, **agent_kwargs(name, episode=episode, seed=seed))


class StudyEvaluator:
    """Env evaluator that runs each proposal as a trial of an Optuna study (see module docstring)."""

    def __init__(
        self,
        space: SearchSpace,
        run_trial: Callable[[dict[str, Any]], Mapping[str, float] | None],
        *,
        table: TableEvaluator | None = None,
    ) -> None:
        self.space = space
        self.run_trial = run_trial
        self.table = table
        self.bounds_from = table or TrainingEvaluator(space)
        self.batched = False
        self.next_result: Mapping[str, float] | None = None

    def __call__(self, config: AttentionConfig, values: Mapping[str, Any]) -> dict[str, float] | None:
        if self.batched:  # evaluated with the other envs' proposals by the vector env
            metrics, self.next_result = self.next_result, None
        else:
            metrics = self.run_trial(dict(values))
        return dict(metrics) if metrics is not None else None

    def bounds(self, space: SearchSpace, metric: str, grids: list[list[Any]]) -> tuple[float, float]:
        return self.bounds_from.bounds(space, metric, grids)

    def grids(self, space: SearchSpace, bins: int) -> list[list[Any]]:
        return self.bounds_from.grids(space, bins)


def run_agent(
    name: str,
    space: SearchSpace,
    run_trial: Callable[[dict[str, Any]], Mapping[str, float] | None],
    *,
    n_trials: int,
    seed: int,
    compute: str,
    bins: int = 5,
    pretrain: str | None = None,
    pretrain_steps: int = 2000,
    agent_path: str | Path | None = None,
    save_to: str | Path | None = None,
    grid_table: str | None = None,
    run_batch: RunBatch | None = None,
    n_envs: int = 1,
) -> None:
    """Search for ``n_trials`` trials with an SB3 agent; saves the agent to ``save_to``.

    ``grid_table``: a recorded table whose values (and compute bounds) define the action grid, as
    with ``--evaluator table:PATH`` or after ``pretrain``. With ``run_batch`` the agent acts in
    ``n_envs`` environments at once and each vector step's ``n_envs`` proposals are evaluated
    together by ``run_batch`` (in parallel on a Ray cluster).
    """
    compute_metric = M.COMPUTE_OBJECTIVES.get(compute)
    if pretrain is None and grid_table is None and compute_metric not in (M.FLOPS, M.PARAMS):
        raise ValueError(
            f"--strategy {name} with real training normalises compute by analytic bounds: use --compute flops or "
            "params, or give --pretrain TABLE (its bounds)"
        )
    table = TableEvaluator(pretrain, space) if pretrain else None
    episode = max(2, min(EPISODE, n_trials))
    agent = None
    if table is not None:
        table_env: Any = AttentionSearchEnv(space, table, budget=episode, bins=bins, compute=compute)
        if run_batch is not None and n_envs > 1:  # the agent keeps its number of envs for the real search
            from stable_baselines3.common.vec_env import DummyVecEnv

            table_env = DummyVecEnv([lambda: AttentionSearchEnv(space, table, budget=episode, bins=bins,
                                                                compute=compute)] * n_envs)  # fmt: skip
        agent = make_agent(name, table_env, episode=episode, seed=seed, path=agent_path)
        agent.learn(total_timesteps=pretrain_steps)
    grid_from = table or (TableEvaluator(grid_table, space) if grid_table else None)
    env: Any
    if run_batch is None:
        env = AttentionSearchEnv(space, StudyEvaluator(space, run_trial, table=grid_from), budget=episode, bins=bins,
                                 compute=compute)  # fmt: skip
    else:
        env = _batched_env(space, run_trial, run_batch, n_envs, table=grid_from, episode=episode, bins=bins,
                           compute=compute)  # fmt: skip
    if agent is None:
        agent = make_agent(name, env, episode=episode, seed=seed, path=agent_path)
    else:
        agent.set_env(env)
    with contextlib.suppress(BudgetReached):  # rollouts are whole episodes; the runner stops at the budget
        agent.learn(total_timesteps=n_trials + episode, reset_num_timesteps=False)
    if save_to is not None:
        agent.save(str(save_to))


def _batched_env(
    space: SearchSpace, run_trial: Callable[[dict[str, Any]], Mapping[str, float] | None], run_batch: RunBatch,
    n_envs: int, *, table: TableEvaluator | None, episode: int, bins: int, compute: str,
) -> Any:  # fmt: skip
    """``n_envs`` environments whose proposals of one vector step are evaluated together.

    SB3's ``DummyVecEnv`` steps its environments one after the other, and an environment's step
    evaluates its proposal; here ``step_wait`` first decodes every environment's action, hands the
    batch to ``run_batch``, and only then lets each environment step on its ready result.
    """
    from stable_baselines3.common.vec_env import DummyVecEnv

    from attn_search.envs.attention_search import decode

    envs = []
    for _ in range(n_envs):
        evaluator = StudyEvaluator(space, run_trial, table=table)
        evaluator.batched = True
        envs.append(AttentionSearchEnv(space, evaluator, budget=episode, bins=bins, compute=compute))

    class BatchedVecEnv(DummyVecEnv):
        def step_wait(self) -> Any:
            proposals = [decode(e.space, e.grids, action) for e, action in zip(envs, self.actions, strict=True)]
            for e, result in zip(envs, run_batch(proposals), strict=True):
                e.evaluator.next_result = result
            return super().step_wait()

    return BatchedVecEnv([functools.partial(_same, e) for e in envs])


def _same(value: Any) -> Any:
    return value
