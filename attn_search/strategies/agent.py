"""The grid RL strategies (``ppo-grid``, ``a2c``): a stable-baselines3 agent acting in
``AttentionSearchEnv``, one ``MultiDiscrete`` action dimension per parameter of one space's grid.

(``--strategy ppo`` is the candidate policy of :mod:`attn_search.strategies.candidates`, which acts
on any space; these agents act on a fixed grid and learn within one search.)

The agent is a strategy like the Optuna samplers: the search loop asks it for proposals and tells
it results, on any backend, and it has no thread of its own. It acts in one environment per trial
the backend runs at once and collects its rollout in the loop's calls (:class:`_Rollout`): a
vector step samples every environment's action, :meth:`ask` hands them out as proposals, and once
the loop has told the result of each, :meth:`tell` steps the environments on them (the reward is
the step's gain of the environment's running front's normalised hypervolume), stores the step in
SB3's rollout buffer and, when the rollout is full, runs SB3's own update (``train()``).

What the agent receives for each of its proposals:

* complete: the trial's accuracy and compute;
* stopped early (pruned): the accuracy reached at the rung where it was stopped, with its compute,
  a lower bound of what the full budget would have reached; such a point rarely improves the
  front, so the reward is usually 0;
* failed: no point (reward 0; the observation's "completed" flag is 0).

Trials the agent did not propose (interrupted trials run again on ``--resume``) are recorded but
not given to it. The agent is saved to ``RUN_DIR/agent.zip`` after every rollout, and a resumed
search continues from that file. Its hyperparameters fit budgets of tens to hundreds of trials
(SB3's defaults, 2048 steps per update, would never update): one update per episode of
:data:`EPISODE` trials per environment (fewer for small budgets: at least three updates a search), a small MLP, a larger learning rate and some entropy bonus
to keep exploring. ``pretrain`` first trains the agent on a recorded table (fast, no training),
after which the search uses the table's grid so the action spaces match.
"""

from __future__ import annotations

import collections
import functools
import json
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from attn_search.engine import metrics as M
from attn_search.engine.config import AttentionConfig
from attn_search.envs.attention_search import AttentionSearchEnv
from attn_search.search.evaluators import (
    Evaluator,
    TableEvaluator,
    TrainingEvaluator,
    canonical,
    decode,
    make_evaluator,
)
from attn_search.search.pareto import normalized_hypervolume
from attn_search.search.space import SearchSpace
from attn_search.strategies.base import Outcome, StrategyContext, match_key, quiet

AGENTS = ("ppo-grid", "a2c")
EPISODE = 10
AGENT_FILE = "agent.zip"
NO_AGENT = "none"
"""``--agent none``: train the agent from scratch, never the shipped one."""
SHIPPED_AGENTS = Path(__file__).with_name("agents")
"""Agents meta-trained on the shipped tables (package data; ``make agent`` rebuilds them): an SB3
``.zip`` beside a ``.json`` that names its grid (see :func:`agent_info`)."""


# -- agents that carry their grid ----------------------------------------------------------------
def agent_info(path: str | Path) -> dict[str, Any] | None:
    """What a meta-trained agent's sidecar (``AGENT.json`` beside ``AGENT.zip``) says: ``algo``,
    ``space``, ``grid`` (the values each parameter's action selects, in the space's order),
    ``tables``, ``steps``, ``seconds``; ``None`` for an agent without one (its grid is then the
    evaluator's, as for an agent trained in a search)."""
    side = Path(path).with_suffix(".json")
    return json.loads(side.read_text()) if side.is_file() else None


def grid_for(space: SearchSpace, info: Mapping[str, Any]) -> list[list[Any]] | None:
    """The agent's grid in ``space``'s terms, or ``None`` when the agent does not fit the space:
    other parameters (the action and observation shapes would differ), or a value the space cannot
    take."""
    grid = info.get("grid") or {}
    if [p.name for p in space.params] != list(grid):
        return None
    out = []
    for p in space.params:
        values = []
        for v in grid[p.name]:
            if p.kind == "categorical":
                match = [c for c in p.choices if canonical(c) == canonical(v)]
                if not match:
                    return None
                values.append(match[0])
            else:
                assert p.low is not None and p.high is not None
                if not p.low * (1 - 1e-9) <= float(v) <= p.high * (1 + 1e-9):
                    return None
                values.append(int(v) if p.kind == "int" else float(v))
        out.append(values)
    return out


def shipped_agents(name: str) -> list[tuple[Path, dict[str, Any]]]:
    """The shipped agents of algorithm ``name``, with their sidecar info."""
    found = [(side.with_suffix(".zip"), agent_info(side)) for side in sorted(SHIPPED_AGENTS.glob("*.json"))]
    algo = {"ppo-grid": "ppo"}.get(name, name)  # (the grid agent's sidecars say "ppo")
    return [(path, info) for path, info in found if info and info.get("algo") == algo
            and info.get("kind") != "candidate-policy" and path.is_file()]  # fmt: skip


def shipped_agent(name: str, space: SearchSpace, compute: str = M.FLOPS) -> tuple[Path, dict[str, Any]] | None:
    """The shipped agent of algorithm ``name`` that fits ``space`` (:func:`grid_for`) and was
    trained against the ``compute`` objective, if any. ``flops`` and ``attn_flops`` serve each
    other where the space fixes width and depth: they differ there by a constant, which the
    hypervolume's normalised range removes, so the agent sees the same observations and rewards."""
    for path, info in shipped_agents(name):
        trained = info.get("compute", M.FLOPS)
        same = trained == compute or (
            space.fixed_size
            and {M.COMPUTE_OBJECTIVES.get(trained), M.COMPUTE_OBJECTIVES.get(compute)} <= set(M.ENTRY_COUNTED)
        )
        if grid_for(space, info) is not None and same:
            return path, info
    return None


def describe_grid(space: SearchSpace, grids: Sequence[Sequence[Any]]) -> str:
    """``n_heads 2/4/8, lr 0.003/0.008; fixed: dropout=0`` (what an agent's grid searches)."""
    searched = [f"{p.name} {'/'.join(f'{v:g}' if isinstance(v, float) else str(v) for v in g)}"
                for p, g in zip(space.params, grids, strict=True) if len(g) > 1]  # fmt: skip
    fixed = [f"{p.name}={g[0]:g}" if isinstance(g[0], float) else f"{p.name}={g[0]}"
             for p, g in zip(space.params, grids, strict=True) if len(g) == 1]  # fmt: skip
    return ", ".join(searched) + (f"; fixed: {', '.join(fixed)}" if fixed else "")


def agent_kwargs(name: str, *, episode: int, seed: int | None) -> dict[str, Any]:
    """SB3 hyperparameters for search budgets of tens to hundreds of trials."""
    common: dict[str, Any] = {"seed": seed, "verbose": 0, "device": "cpu", "gamma": 0.9,
                              "policy_kwargs": {"net_arch": [64, 64]}}  # fmt: skip
    if name == "ppo-grid":
        return {**common, "n_steps": episode, "batch_size": episode, "n_epochs": 10, "learning_rate": 3e-3,
                "ent_coef": 0.01}  # fmt: skip
    if name == "a2c":
        return {**common, "n_steps": episode, "learning_rate": 3e-3, "ent_coef": 0.01}
    raise ValueError(f"RL strategy {name!r} is unknown: use one of {', '.join(AGENTS)}")


def make_agent(
    name: str, env: Any, *, episode: int = EPISODE, seed: int | None = None, path: str | Path | None = None
) -> Any:
    """A new agent, or one loaded from an SB3 ``.zip`` (``path``) and attached to ``env``; a loaded
    agent updates once per ``episode`` trials per environment (its rollout length is set to it)."""
    from stable_baselines3 import A2C, PPO

    cls = PPO if name == "ppo-grid" else A2C
    if path is not None and Path(path).is_file():
        rollout: dict[str, Any] = {"n_steps": episode}
        if cls is PPO:
            rollout["batch_size"] = max(2, episode * env.num_envs)
        return quiet(cls.load(str(path), env=env, device="cpu", custom_objects=rollout))
    return quiet(cls("MlpPolicy", env, **agent_kwargs(name, episode=episode, seed=seed)))


class _Handed:
    """Env evaluator whose result is handed in by the vector env before the env steps."""

    def __init__(self, grid_from: Evaluator) -> None:
        self.grid_from = grid_from
        self.next_result: Mapping[str, float] | None = None

    def __call__(self, config: AttentionConfig, values: Mapping[str, Any]) -> dict[str, float] | None:
        result, self.next_result = self.next_result, None
        return dict(result) if result is not None else None

    def bounds(self, space: SearchSpace, metric: str, grids: list[list[Any]]) -> tuple[float, float]:
        return self.grid_from.bounds(space, metric, grids)

    def grids(self, space: SearchSpace, bins: int) -> list[list[Any]]:
        return self.grid_from.grids(space, bins)


class _OnGrid:
    """An evaluator whose action grid is a meta-trained agent's (bounds over that grid)."""

    def __init__(self, base: Evaluator, grids: list[list[Any]]) -> None:
        self.base = base
        self._grids = grids

    def __call__(self, config: AttentionConfig, values: Mapping[str, Any]) -> dict[str, float] | None:
        return self.base(config, values)

    def bounds(self, space: SearchSpace, metric: str, grids: list[list[Any]]) -> tuple[float, float]:
        return self.base.bounds(space, metric, grids)

    def grids(self, space: SearchSpace, bins: int) -> list[list[Any]]:
        return [list(g) for g in self._grids]


class _Rollout:
    """SB3's ``collect_rollouts`` turned inside out, so that the search loop drives it: SB3's
    on-policy algorithms only pull from their environment (``learn()`` steps it and waits for the
    result), while the loop pushes results as trials end. :meth:`act` samples a vector step's
    actions with the policy; :meth:`step` steps the environments on the results, fills the rollout
    buffer as ``collect_rollouts`` does (timeout bootstrapping included) and runs the algorithm's
    own ``train()`` once ``n_steps`` steps are in. The update arithmetic is SB3's."""

    def __init__(self, agent: Any) -> None:
        self.agent = agent
        agent._setup_learn(total_timesteps=_FOREVER, callback=None, reset_num_timesteps=False)
        self.n_steps = 0  # steps in the rollout buffer
        self._step: tuple[np.ndarray, Any, Any] | None = None

    def act(self) -> np.ndarray:
        import torch
        from stable_baselines3.common.utils import obs_as_tensor

        agent = self.agent
        if self.n_steps == 0:
            agent.policy.set_training_mode(False)
            agent.rollout_buffer.reset()
        with torch.no_grad():
            actions, values, log_probs = agent.policy(obs_as_tensor(agent._last_obs, agent.device))
        self._step = (actions.cpu().numpy(), values, log_probs)
        return self._step[0]

    def step(self) -> bool:
        """Step the environments on the actions of :meth:`act` (their results handed to them);
        ``True`` when this completed a rollout and the agent was updated."""
        import torch
        from stable_baselines3.common.utils import obs_as_tensor

        assert self._step is not None, "act() first"
        agent, (actions, values, log_probs) = self.agent, self._step
        new_obs, rewards, dones, infos = agent.env.step(actions)
        agent.num_timesteps += agent.env.num_envs
        agent._update_info_buffer(infos, dones)
        for idx, done in enumerate(dones):  # a truncated episode: bootstrap from its last observation
            if done and infos[idx].get("terminal_observation") is not None and infos[idx].get("TimeLimit.truncated"):
                terminal_obs = agent.policy.obs_to_tensor(infos[idx]["terminal_observation"])[0]
                with torch.no_grad():
                    rewards[idx] += agent.gamma * agent.policy.predict_values(terminal_obs)[0]
        agent.rollout_buffer.add(agent._last_obs, actions, rewards, agent._last_episode_starts, values, log_probs)
        agent._last_obs, agent._last_episode_starts = new_obs, dones
        self._step = None
        self.n_steps += 1
        if self.n_steps < agent.n_steps:
            return False
        with torch.no_grad():
            last_values = agent.policy.predict_values(obs_as_tensor(new_obs, agent.device))
        agent.rollout_buffer.compute_returns_and_advantage(last_values=last_values, dones=dones)
        agent._update_current_progress_remaining(agent.num_timesteps, _FOREVER)
        agent.train()
        self.n_steps = 0
        return True


_FOREVER = 10**9
"""The total steps SB3 is told it will learn for (a search ends when the loop says so)."""


class AgentStrategy:
    """SB3 agent as an ask/tell strategy (see the module docstring)."""

    def __init__(self, name: str, context: StrategyContext, *, bins: int = 5) -> None:
        if name not in AGENTS:
            raise ValueError(f"RL strategy {name!r} is unknown: use one of {', '.join(AGENTS)}")
        self.name = name
        self.context = context
        self.bins = bins
        self.path = context.run_dir / AGENT_FILE
        self._outbox: collections.deque[tuple[int, dict[str, Any]]] = collections.deque()
        self._results: dict[int, Mapping[str, float] | None] = {}
        self._expected = 0  # proposals of the current vector step; 0: none out
        self._mine: dict[str, list[int]] = {}  # proposals out (by their values) -> env index
        self._envs: list[AttentionSearchEnv] = []
        self._rollout: _Rollout | None = None
        self.agent: Any = None
        self.proposals = 0

    # -- set up --------------------------------------------------------------------------------
    def _grid_from(self, space: SearchSpace) -> Evaluator:
        options = self.context.options
        table = options.get("pretrain") or (
            self.context.evaluator[6:] if self.context.evaluator.startswith("table:") else None
        )
        if table:
            return TableEvaluator(table, space)
        if self.context.evaluator not in ("training",) and not self.context.evaluator.startswith("table:"):
            return make_evaluator(self.context.evaluator, space)
        return TrainingEvaluator(space, task=self.context.task, task_kwargs=self.context.task_kwargs)

    def _starting_agent(self, space: SearchSpace) -> tuple[str | Path | None, dict[str, Any] | None, str]:
        """Which agent the search starts from: the run's own on ``--resume``, ``--agent PATH``, a
        new one (``--agent none``, ``--pretrain``), or the shipped meta-trained agent where it
        fits the space and the search really trains; with its sidecar info and a description."""
        options = self.context.options
        if self.context.resume and self.path.is_file():
            return self.path, agent_info(self.path), f"continuing from {self.path}"
        given = options.get("agent")
        if given == NO_AGENT or options.get("pretrain"):
            return None, None, "a new agent"
        if given:  # (check_strategy refused a file that is missing or made for other parameters)
            return given, agent_info(given), f"starting from {given}"
        if self.context.evaluator != "training":
            return None, None, "a new agent"  # a replay compares agents: the shipped one only on request
        shipped = shipped_agent(self.name, space, self.context.compute)
        if shipped is None:
            fitting = [info for _, info in shipped_agents(self.name) if grid_for(space, info) is not None]
            if fitting:
                trained = fitting[0].get("compute", M.FLOPS)
                serves = "attn_flops" if trained in M.ENTRY_COUNTED and space.fixed_size else trained
                return None, None, (f"a new agent: the shipped {self.name} agent was meta-trained against {trained}, "
                                    f"another compute objective than this search's {self.context.compute}, so this "
                                    f"one starts untrained (--compute {serves} uses it)")  # fmt: skip
            if shipped_agents(self.name):
                return None, None, (f"a new agent: the shipped {self.name} agent was meta-trained on other "
                                    "parameters than this search's, so this one starts untrained")  # fmt: skip
            return None, None, "a new agent"
        path, info = shipped
        tables = ", ".join(info.get("tables", [])) or "recorded tables"
        return path, info, (f"the shipped agent {path.name}, meta-trained on {tables} ({info.get('steps')} "
                            f"environment steps; --agent none to train one from scratch)")  # fmt: skip

    def start(self, history: Sequence[tuple[dict[str, Any], Outcome]]) -> str | None:
        # (a resumed search continues from the run's saved agent, which learned from those trials)
        from stable_baselines3.common.vec_env import DummyVecEnv

        space, options = self.context.space, self.context.options
        resume_from, info, how = self._starting_agent(space)
        grid_from = self._grid_from(space)
        grids = grid_for(space, info) if info is not None else None
        if grids is not None:  # a meta-trained agent acts on its tables' grid: its action space
            grid_from = _OnGrid(grid_from, grids)
            self.path.with_suffix(".json").write_text(json.dumps(info, indent=1))  # --resume reads it
        n_envs = max(1, self.context.slots)
        # at least three updates in a search: one env, 12 trials: updates after trials 4, 8 and 12
        # (a rollout is `episode` steps of every env, so more envs mean shorter episodes). An agent
        # started from a file (a meta-trained one) sees the whole search as one episode, as it was
        # trained to, and updates at its end.
        episode = max(2, min(EPISODE, self.context.trials // (3 * n_envs)))
        if info is not None or options.get("agent") not in (None, NO_AGENT):  # (also on --resume)
            episode = max(2, -(-self.context.trials // n_envs))
        envs = [
            AttentionSearchEnv(space, _Handed(grid_from), budget=episode, bins=self.bins, compute=self.context.compute)
            for _ in range(n_envs)
        ]
        self._envs = envs
        vec = DummyVecEnv([functools.partial(_same, e) for e in envs])
        if options.get("pretrain") and resume_from is None:
            table_env: Any = DummyVecEnv([functools.partial(
                AttentionSearchEnv, space, grid_from, budget=episode, bins=self.bins, compute=self.context.compute,
            )] * n_envs)  # fmt: skip
            self.agent = make_agent(self.name, table_env, episode=episode, seed=self.context.seed)
            self.agent.learn(total_timesteps=int(options.get("pretrain_steps", 2000)))
            self.agent.set_env(vec)
        else:
            self.agent = make_agent(self.name, vec, episode=episode, seed=self.context.seed, path=resume_from)
            if resume_from is not None:
                self.agent.set_random_seed(self.context.seed)  # a loaded agent would replay its first actions

        self._rollout = _Rollout(self.agent)
        if options.get("pretrain") and resume_from is None:
            how += f", pretrained for {options.get('pretrain_steps')} steps on {options['pretrain']}"
        message = (f"  {self.name}: {how} ({self.agent.num_timesteps} environment steps so far), acting in "
                   f"{n_envs} environment(s); saved to {self.path} after every rollout")  # fmt: skip
        if grids is not None:
            message += f"\n  {self.name}: searching its grid: {describe_grid(space, grids)}"
        return message

    def save(self) -> None:
        """Write the agent to ``RUN_DIR/agent.zip`` atomically (a kill never leaves half a file)."""
        if self.agent is None:
            return
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        self.agent.save(str(tmp))
        saved = tmp if tmp.exists() else tmp.with_name(tmp.name + ".zip")  # SB3 appends .zip when missing
        os.replace(saved, self.path)

    # -- the loop's side -----------------------------------------------------------------------
    def ask(self) -> dict[str, Any] | None:
        if not self._outbox:
            if self._expected:
                return None  # every proposal of this step is out: nothing more until results come back
            assert self._rollout is not None, "start() first"
            actions = self._rollout.act()
            proposals = [decode(e.space, e.grids, a) for e, a in zip(self._envs, actions, strict=True)]
            self._outbox.extend(enumerate(proposals))
            self._results, self._expected = {}, len(proposals)
        index, values = self._outbox.popleft()
        values = self._clip(values)
        self._mine.setdefault(match_key(self.context.space.active_values(values)), []).append(index)
        self.proposals += 1
        return values

    def _clip(self, values: dict[str, Any]) -> dict[str, Any]:
        """Grid points computed in floating point (``1e-2`` as ``0.010000000000000004``) may lie a
        rounding error outside a parameter's range, which Optuna would not store as given."""
        out = dict(values)
        for p in self.context.space.params:
            if p.name in out and p.kind in ("int", "float") and p.low is not None and p.high is not None:
                value = min(max(out[p.name], p.low), p.high)
                out[p.name] = round(value) if p.kind == "int" else float(value)
        return out

    def tell(self, values: dict[str, Any], outcome: Outcome) -> None:
        state, metrics = outcome.state, outcome.metrics
        mine = self._mine.get(match_key(values))
        if not mine:
            return  # not the agent's proposal (a trial run again on resume)
        index = mine.pop(0)
        point = None
        if state in (M.COMPLETE, M.PRUNED) and metrics is not None:
            point = {m: float(metrics[m]) for m in self.context.space.metrics if m in metrics}
            if len(point) != len(self.context.space.metrics) or any(np.isnan(v) for v in point.values()):
                point = None
        self._results[index] = point
        if len(self._results) < self._expected:
            return
        for e, i in zip(self._envs, range(self._expected), strict=True):
            assert isinstance(e.evaluator, _Handed)
            e.evaluator.next_result = self._results[i]
        self._expected = 0
        assert self._rollout is not None
        if self._rollout.step():
            self.save()  # after every update: a resumed search continues from it

    def close(self) -> None:
        self.save()


def _same(value: Any) -> Any:
    return value


# -- meta-training on recorded tables --------------------------------------------------------------
META_BUDGETS = (10, 20, 50)
"""Search lengths a meta-trained agent practises (one environment per table and length)."""


def meta_kwargs(seed: int | None) -> dict[str, Any]:
    """PPO hyperparameters for meta-training over many table environments: a rollout is one
    50-trial search of every environment, returns are final hypervolumes (no discount)."""
    return {"seed": seed, "verbose": 0, "device": "cpu", "gamma": 1.0, "gae_lambda": 0.95, "n_steps": 50,
            "batch_size": 150, "n_epochs": 5, "learning_rate": 1e-3, "ent_coef": 0.01,
            "policy_kwargs": {"net_arch": [128, 128]}}  # fmt: skip


def meta_train(
    tables: Sequence[str | Path],
    space: SearchSpace,
    *,
    steps: int,
    seed: int = 0,
    budgets: Sequence[int] = META_BUDGETS,
    compute: str = "flops",
    out: str | Path | None = None,
) -> Any:
    """A PPO agent trained across recorded tables: one environment per table and search length,
    each episode a whole search of that table, rewards the hypervolume gain divided by the table's
    best hypervolume (so every task counts alike). ``steps``: environment steps in all. Saved to
    ``out`` when given, with the sidecar ``out.json`` naming its grid (:func:`agent_info`), so a
    search with ``--agent out.zip`` acts on that grid. Every table must have the same grid (the
    agent's action space)."""
    from stable_baselines3 import PPO
    from stable_baselines3.common.vec_env import DummyVecEnv

    lookups = [TableEvaluator(t, space) for t in tables]
    grids = [lk.grids(space, 0) for lk in lookups]
    for path, grid in zip(tables[1:], grids[1:], strict=True):
        if grid != grids[0]:
            raise ValueError(f"{path} was recorded on another grid than {tables[0]}: the agent's actions would differ")
    factories: list[Any] = []
    for lookup in lookups:
        scale = _table_best_hypervolume(lookup, space, compute)
        for b in budgets:
            factories.append(functools.partial(AttentionSearchEnv, space, lookup, budget=b, compute=compute,
                                               reward_scale=1.0 / scale))  # fmt: skip
    kwargs = meta_kwargs(seed)
    buffer = kwargs["n_steps"] * len(factories)  # mini-batches that divide the rollout: none truncated
    kwargs["batch_size"] = max(d for d in range(1, kwargs["batch_size"] + 1) if buffer % d == 0)
    agent = quiet(PPO("MlpPolicy", DummyVecEnv(factories), **kwargs))
    start = time.perf_counter()
    agent.learn(total_timesteps=steps)
    if out is not None:
        out = Path(out).with_suffix(".zip")
        agent.save(str(out))
        info = {"algo": "ppo", "space": space.name, "tables": [Path(t).stem for t in tables], "steps": steps,
                "seed": seed, "budgets": list(budgets), "compute": compute,
                "seconds": round(time.perf_counter() - start, 1),
                "grid": {p.name: [canonical(v) for v in g] for p, g in zip(space.params, grids[0], strict=True)}}  # fmt: skip
        out.with_suffix(".json").write_text(json.dumps(info, indent=1) + "\n")
    return agent


def _table_best_hypervolume(lookup: TableEvaluator, space: SearchSpace, compute: str) -> float:
    env = AttentionSearchEnv(space, lookup, budget=1, compute=compute)
    points = [[row[m] for m in env.metrics] for row in lookup.rows.values()]
    return float(normalized_hypervolume(points, env.directions, lower=env.lower, upper=env.upper)) or 1.0
