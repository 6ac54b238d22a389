"""The learned proposer: a policy that scores candidate configurations (MetaBO-style).

MetaBO (Volpp et al., ICLR 2020, arXiv:1904.02642) meta-trains with RL a neural acquisition
function: at each step a set of candidates is scored from per-candidate features, and the policy
picks one. Because the features do not depend on the space's shape, the same policy acts on any
search space. Here:

* **Descriptors** (:func:`describe`): what a configuration *computes*, in fixed terms for any
  space whose configurations are :class:`~attn_search.engine.config.AttentionConfig`: which key
  offsets the pattern reaches at the task's length (coverage of 7 log-spaced offset bands), whether
  queries see the first positions (global tokens), its density, head count, learning rate and
  regularisation. Two configurations with the same mask have the same descriptor.
* **Surrogate**: a Gaussian process on the descriptors of the search so far (Matern 5/2, its
  length scale chosen by marginal likelihood, its amplitude the spread of the accuracies seen but at
  least :attr:`GP.SD_FLOOR`), giving each candidate a predicted accuracy and an uncertainty.
  Compute is known before training (analytic FLOPs, at the length that counts).
* **Features** per candidate (:data:`FEATURES`): the surrogate's mean and uncertainty, the
  predicted improvement, the candidate's compute, the front's hypervolume gain if the candidate
  reached its mean or its mean plus one or two standard deviations, and the budget used.
* **Policy** (:class:`CandidatePolicy`): one small MLP scores every candidate (shared weights, so
  the candidates' order and number do not matter), plus a learned multiple of the optimistic
  hypervolume gain, so that an untrained policy starts near a UCB-style acquisition and
  meta-training learns what to change. A stable-baselines3 PPO ``ActorCriticPolicy``.
* **Meta-training** (:func:`meta_train`): PPO on :class:`CandidateEnv` episodes, each a search of
  one recorded table (one task family) with a budget of 10, 20 or 50 trials and compute counted
  at the task's length or at a deployment length. Rewards are the hypervolume gains divided by
  the table's best hypervolume, so the return is one minus the regret.

The strategy (:class:`CandidateStrategy`, ``--strategy ppo``) queries the policy in :meth:`ask`
and draws a candidate from its distribution with the search's seeded generator, as PPO acted in
meta-training (:func:`choose`): no thread, no environment of its own. Its candidates are the
untried rows of a table (replays) or draws from the space (real searches), so it works on any
space.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from attn_search.engine import metrics as M
from attn_search.engine.config import AttentionConfig
from attn_search.engine.cost import analytic_compute, model_flops
from attn_search.engine.patterns import pattern_mask
from attn_search.search.evaluators import recorded_compute_length, recorded_task
from attn_search.strategies.base import Outcome, StrategyContext, quiet

N_CANDIDATES = 128
"""Candidates the policy chooses among at each step. (It was 32: a recorded table holds 312
configurations, so the candidate a surrogate would rank first was mostly not among them, and on
held-out MQAR at L=4096 the policy stayed at regret 0.20 after 10 trials where the portfolio's first
five then GP reached 0.010; with 128 it reaches 0.015. ``benchmarks/family_out.py``.)"""
BANDS = ((1, 1), (2, 3), (4, 7), (8, 15), (16, 31), (32, 63), (64, 1 << 30))
"""Key offsets (query - key) whose coverage a descriptor holds."""
DESCRIPTOR = (*(f"reach_{lo}" for lo, _ in BANDS), "global", "density", "heads", "lr", "dropout", "attn_dropout",
              "weight_decay", "label_smoothing")  # fmt: skip
FEATURES = ("mean", "sd", "improvement", "compute", "gain_mean", "gain_ucb1", "gain_ucb2", "budget_used")
"""Per-candidate inputs of the policy, in order: the surrogate's view of the candidate, not the
candidate itself. (A first version also fed the descriptor to the policy; meta-trained on seven
families it learned their preferences, "8 heads, BigBird or dense", and on held-out ListOps never
left them: regret 0.15-0.34 at 20 trials against 0.05-0.19 for the untrained acquisition.) The
descriptor reaches the policy only through the surrogate, as in MetaBO."""
GAIN_UCB = FEATURES.index("gain_ucb1")
FEATURE_BOUND = 10.0
"""Features are clipped to ``[-FEATURE_BOUND, FEATURE_BOUND]`` (the observation space's bounds)."""
SHIPPED = Path(__file__).with_name("agents") / "candidate-ppo.zip"
"""The shipped meta-trained policy (``make agent``); its sidecar ``.json`` says what it saw."""


# -- descriptors ----------------------------------------------------------------------------------
@functools.lru_cache(maxsize=4096)
def _reach(pattern: str, seq_len: int, causal: bool, params: tuple[tuple[str, Any], ...]) -> tuple[float, ...]:
    mask = pattern_mask(pattern, seq_len, causal=causal, **dict(params))
    q = torch.arange(seq_len)
    offset = (q[:, None] - q[None, :]).abs()  # (L, L)
    out = []
    for lo, hi in BANDS:
        band = (offset >= lo) & (offset <= hi) & (q[None, :] <= q[:, None] if causal else True)
        n = int(band.sum())
        out.append(float((mask & band).sum()) / n if n else 0.0)
    late = q >= min(max(16, seq_len // 4), seq_len - 1)  # queries past a small window
    glob = float(mask[late][:, :2].any(dim=1).float().mean()) if late.any() else 0.0
    allowed = (q[None, :] <= q[:, None]).sum() if causal else seq_len * seq_len
    return (*out, glob, float(mask.sum()) / float(allowed))


def describe(config: AttentionConfig, seq_len: int) -> np.ndarray:
    """The configuration's descriptor (:data:`DESCRIPTOR`), each entry in about ``[0, 1]``."""
    reach = _reach(config.pattern, seq_len, config.causal, tuple(sorted(config.pattern_params().items())))
    lr = (math.log(config.lr) - math.log(1e-3)) / (math.log(3e-2) - math.log(1e-3))
    wd = (math.log(max(config.weight_decay, 1e-5)) - math.log(1e-4)) / (math.log(0.1) - math.log(1e-4))
    return np.array([*reach, math.log2(config.n_heads) / 3, lr, config.dropout * 5, config.attn_dropout * 10, wd,
                     config.label_smoothing * 10], dtype=np.float64)  # fmt: skip


# -- the surrogate ------------------------------------------------------------------------------------
def _matern52(a: np.ndarray, b: np.ndarray, length: float) -> np.ndarray:
    d = np.sqrt(np.maximum(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1), 0.0)) / length
    return (1 + math.sqrt(5) * d + 5.0 / 3.0 * d**2) * np.exp(-math.sqrt(5) * d)


class GP:
    """Gaussian-process regression of accuracy on descriptors. Why not Optuna's GPSampler: it
    proposes configurations of one space; here the policy needs the posterior at candidates it
    chooses among, on descriptors, within a millisecond."""

    LENGTHS = (0.5, 1.0, 2.0, 4.0)
    NOISE = 1e-2
    SD_FLOOR = 0.1
    """The prior's amplitude (accuracy units) is the observed spread, but never below this: after a
    few configurations all near chance (selective copy's cheap windows) the spread is ~0.005, and a
    prior that narrow says nothing untried can do better, so the search never left the cheap
    corner (regret 0.29 from trial 5 to 50 on held-out selective copy at L=4096)."""

    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        self.n = len(y)
        self.mean_y = float(y.mean()) if self.n else 0.5
        self.sd_y = max(float(y.std()), self.SD_FLOOR) if self.n > 1 else 0.25
        if not self.n:
            return
        self.x = x
        z = (y - self.mean_y) / self.sd_y
        best = None
        for length in self.LENGTHS:  # marginal likelihood over a few length scales
            k = _matern52(x, x, length) + self.NOISE * np.eye(self.n)
            chol = np.linalg.cholesky(k)
            alpha = np.linalg.solve(chol.T, np.linalg.solve(chol, z))
            lml = -0.5 * z @ alpha - np.log(np.diag(chol)).sum()
            if best is None or lml > best[0]:
                best = (lml, length, chol, alpha)
        assert best is not None
        _, self.length, self.chol, self.alpha = best

    def predict(self, xs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Posterior mean and standard deviation of accuracy at ``xs``."""
        if not self.n:
            return np.full(len(xs), self.mean_y), np.full(len(xs), self.sd_y)
        ks = _matern52(xs, self.x, self.length)
        mean = ks @ self.alpha
        v = np.linalg.solve(self.chol, ks.T)
        var = np.maximum(1.0 - (v**2).sum(0), 1e-9)
        return self.mean_y + self.sd_y * mean, self.sd_y * np.sqrt(var)


def _hv_gains(front: np.ndarray, acc: np.ndarray, cost: np.ndarray) -> np.ndarray:
    """Gain of the normalised 2-D hypervolume (accuracy up, cost in [0, 1] down, reference (0, 1))
    from adding each candidate ``(acc[i], cost[i])`` to ``front`` ``(n, 2)``, for every candidate at
    once: the front's best accuracy is a step function of cost (0 before its cheapest point), and a
    candidate raises it to ``acc[i]`` from ``cost[i]`` on, so its gain is the area between."""
    acc, cost = np.clip(acc, 0.0, 1.0), np.clip(cost, 0.0, 1.0)
    if len(front) == 0:
        return acc * (1.0 - cost)
    pts = front[np.argsort(front[:, 1], kind="stable")]
    hi = np.concatenate([pts[:, 1], [1.0]])  # segment i ends where point i starts (the last at 1)
    lo = np.concatenate([[0.0], hi[:-1]])
    level = np.concatenate([[0.0], np.maximum.accumulate(pts[:, 0])])  # the front's accuracy on segment i
    overlap = np.clip(hi[None, :] - np.maximum(lo[None, :], cost[:, None]), 0.0, None)  # (N, n + 1)
    return (overlap * np.clip(acc[:, None] - level[None, :], 0.0, None)).sum(1)


def _hv(points: np.ndarray) -> float:
    pts = points[np.argsort(points[:, 1])]  # by cost, cheapest first
    total, best = 0.0, 0.0
    for i, (a, c) in enumerate(pts):
        best = max(best, a)
        nxt = pts[i + 1, 1] if i + 1 < len(pts) else 1.0
        total += best * (nxt - c)
    return total


def candidate_features(
    descriptors: np.ndarray, costs: np.ndarray, seen_x: np.ndarray, seen_acc: np.ndarray, front: np.ndarray,
    used: float,
) -> np.ndarray:  # fmt: skip
    """``(N, len(FEATURES))``: every candidate's inputs to the policy (see the module docstring).
    ``costs`` are normalised to ``[0, 1]``; ``front`` holds the (accuracy, cost) points so far."""
    gp = GP(seen_x, seen_acc)
    mean, sd = gp.predict(descriptors)
    best = float(seen_acc.max()) if len(seen_acc) else 0.0
    scale = max(gp.sd_y, 0.05)
    gains = [_hv_gains(front, mean + k * sd, costs) for k in (0, 1, 2)]
    cols = [(mean - gp.mean_y) / scale, sd / scale, (mean - best) / scale, costs, *(10 * g for g in gains),
            np.full(len(costs), used)]  # fmt: skip
    return np.clip(np.column_stack(cols), -FEATURE_BOUND, FEATURE_BOUND).astype(np.float32)


# -- the policy -------------------------------------------------------------------------------------
class _Scorer(nn.Module):
    """Per-candidate scores (the actor's logits) and a pooled summary (the critic's input) of an
    observation ``(B, N * F)``."""

    def __init__(self, n_features: int, hidden: int = 64) -> None:
        super().__init__()
        self.n_features = n_features
        self.net = nn.Sequential(nn.Linear(n_features, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh())
        self.score = nn.Linear(hidden, 1)
        nn.init.normal_(self.score.weight, std=0.01)
        nn.init.zeros_(self.score.bias)
        # an untrained policy is a greedy optimistic acquisition: logits = gain_ucb * 3 + MLP
        self.ucb_weight = nn.Parameter(torch.tensor(3.0))
        self.latent_dim_pi = N_CANDIDATES
        self.latent_dim_vf = hidden

    def _embed(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = obs.view(obs.shape[0], -1, self.n_features)  # (B, N, F)
        return x, self.net(x)  # (B, N, F), (B, N, hidden)

    def forward_actor(self, obs: torch.Tensor) -> torch.Tensor:
        x, h = self._embed(obs)
        return self.score(h).squeeze(-1) + self.ucb_weight * x[..., GAIN_UCB]  # (B, N)

    def forward_critic(self, obs: torch.Tensor) -> torch.Tensor:
        return self._embed(obs)[1].mean(dim=1)  # (B, hidden)

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.forward_actor(obs), self.forward_critic(obs)


def _policy_class() -> type:
    from stable_baselines3.common.policies import ActorCriticPolicy

    class CandidatePolicy(ActorCriticPolicy):  # type: ignore[misc]
        """SB3's actor-critic with :class:`_Scorer` as its extractor: the actor's logits are the
        candidates' scores (SB3's action head is replaced by the identity), so the policy does not
        depend on the candidates' order. Plugged in through ``policy=`` (SB3's extension point)."""

        def _build_mlp_extractor(self) -> None:
            self.mlp_extractor = _Scorer(len(FEATURES))  # type: ignore[assignment]

        def _build(self, lr_schedule: Any) -> None:
            super()._build(lr_schedule)
            self.action_net = nn.Identity()
            self.optimizer = self.optimizer_class(self.parameters(), lr=lr_schedule(1), **self.optimizer_kwargs)  # type: ignore[call-arg]

    return CandidatePolicy


@functools.lru_cache(maxsize=8)
def load_policy(path: str | Path) -> Any:
    """A saved policy (SB3 ``.zip``), ready to be queried on CPU (cached: a benchmark asks often)."""
    from stable_baselines3 import PPO

    return PPO.load(str(path), device="cpu", custom_objects={"policy_class": _policy_class()})


def choose(policy: Any, features: np.ndarray, rng: np.random.Generator | None = None) -> int:
    """The candidate the policy picks: drawn from its distribution with ``rng`` (how it acted in
    meta-training), or its most likely one without; padding to :data:`N_CANDIDATES` with copies of
    the first candidate where fewer are left."""
    n = len(features)
    padded = (
        np.concatenate([features, np.repeat(features[:1], N_CANDIDATES - n, axis=0)]) if n < N_CANDIDATES else features
    )
    with torch.no_grad():
        obs = torch.as_tensor(padded.reshape(1, -1))
        logits = policy.policy.mlp_extractor.forward_actor(obs)[0, :n].double()
    if rng is None:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits, 0).numpy()
    return int(rng.choice(n, p=probs / probs.sum()))


# -- tables as candidate sets -------------------------------------------------------------------------
class TableTask:
    """A recorded table seen as a candidate set: every row's descriptor, accuracy and compute (at
    the task's length, and at ``deploy_len`` analytic ``deploy_metric``: the whole model's FLOPs
    over kept entries, as meta-training counts them, or another analytic metric such as
    ``attn_tile_flops``), and its best hypervolume."""

    def __init__(self, path: str | Path, *, deploy_len: int | None = None, deploy_metric: str = M.FLOPS) -> None:
        import pandas as pd

        from attn_search.engine.tasks import make_task
        from attn_search.report.outputs import row_config

        self.path = Path(path)
        self.name = self.path.stem
        frame = pd.read_csv(self.path, comment="#")
        frame = frame[frame["state"] == "complete"].reset_index(drop=True)
        self.configs = [row_config(r) for _, r in frame.iterrows()]
        self.family, params = recorded_task(self.path)
        task = make_task(self.family, **params)
        self.seq_len, n_classes = task.seq_len, task.n_classes
        self.accuracy = frame[M.ACCURACY].to_numpy(float)
        self.descriptors = np.stack([describe(c, self.seq_len) for c in self.configs])
        self.costs = {"task": frame[M.FLOPS].to_numpy(float)}
        if recorded_compute_length(self.path) not in (None, self.seq_len):  # (recorded with --target-len)
            self.costs["task"] = np.array([model_flops(c, seq_len=self.seq_len, n_classes=n_classes)
                                           for c in self.configs], dtype=float)  # fmt: skip
        if deploy_len:
            self.costs["deploy"] = np.array([analytic_compute(deploy_metric, c, seq_len=deploy_len, n_classes=n_classes)
                                             for c in self.configs], dtype=float)  # fmt: skip
        self.keys = [json.dumps(c.to_dict(), sort_keys=True) for c in self.configs]

    def normalised_cost(self, length: str) -> np.ndarray:
        """Compute scaled linearly to ``[0, 1]`` over the table's range, as the benchmark's
        hypervolume does (:func:`~attn_search.report.outputs.hypervolume_of_points`)."""
        c = self.costs[length]
        return (c - c.min()) / max(c.max() - c.min(), 1e-12)

    def best_hv(self, length: str) -> float:
        return _hv(np.column_stack([self.accuracy, self.normalised_cost(length)]))


class CandidateEnv(gym.Env):  # type: ignore[misc]
    """Meta-training episodes: a search of one recorded table.

    ## Description
    Each step the agent sees :data:`N_CANDIDATES` untried rows of the table, drawn at random, and
    picks one; its recorded accuracy joins the search's front.

    ## Action Space
    ``Discrete(N_CANDIDATES)``: the candidate's position in the observation.

    ## Observation Space
    ``Box(-10, 10, (N_CANDIDATES * len(FEATURES),), float32)``: each candidate's
    :func:`candidate_features`, row after row.

    ## Rewards
    The gain of the front's normalised hypervolume divided by the table's best, so an episode's
    return is one minus its regret.

    ## Starting State
    No trials; a budget drawn from ``budgets`` and compute counted at a length drawn from
    ``lengths`` (``task``, ``deploy``).

    ## Episode End
    ``terminated`` after ``budget`` trials; never truncated.

    ## Arguments
    ``tables`` (:class:`TableTask` objects; each episode draws one), ``budgets``, ``lengths``.
    """

    metadata: ClassVar[dict[str, Any]] = {"render_modes": []}  # type: ignore[misc]

    def __init__(self, tables: Sequence[TableTask], *, budgets: Sequence[int] = (10, 20, 50),
                 lengths: Sequence[str] = ("task", "deploy")) -> None:  # fmt: skip
        super().__init__()
        self.tables, self.budgets, self.lengths = list(tables), tuple(budgets), tuple(lengths)
        self.action_space = gym.spaces.Discrete(N_CANDIDATES)
        self.observation_space = gym.spaces.Box(-FEATURE_BOUND, FEATURE_BOUND, (N_CANDIDATES * len(FEATURES),),
                                                np.float32)  # fmt: skip

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        rng = self.np_random
        self.table = self.tables[int(rng.integers(len(self.tables)))]
        self.length = self.lengths[int(rng.integers(len(self.lengths)))]
        self.cost = self.table.normalised_cost(self.length)
        self.budget = min(int(self.budgets[int(rng.integers(len(self.budgets)))]), len(self.cost))
        self.scale = self.table.best_hv(self.length)
        self.tried: list[int] = []
        self.hv = 0.0
        return self._observe(), {}

    def _observe(self) -> np.ndarray:
        left = np.setdiff1d(np.arange(len(self.cost)), self.tried)
        self.pool = self.np_random.choice(left, size=min(N_CANDIDATES, len(left)), replace=False)
        t = np.array(self.tried, dtype=int)
        feats = candidate_features(self.table.descriptors[self.pool], self.cost[self.pool], self.table.descriptors[t],
                                   self.table.accuracy[t], np.column_stack([self.table.accuracy[t], self.cost[t]]),
                                   len(self.tried) / self.budget)  # fmt: skip
        if len(feats) < N_CANDIDATES:
            feats = np.concatenate([feats, np.repeat(feats[:1], N_CANDIDATES - len(feats), axis=0)])
            self.pool = np.concatenate([self.pool, np.repeat(self.pool[:1], N_CANDIDATES - len(self.pool))])
        return feats.reshape(-1)

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict]:
        row = int(self.pool[int(action)])
        self.tried.append(row)
        t = np.array(self.tried, dtype=int)
        hv = _hv(np.column_stack([self.table.accuracy[t], self.cost[t]]))
        reward, self.hv = (hv - self.hv) / self.scale, hv
        done = len(self.tried) >= self.budget
        obs = np.zeros(N_CANDIDATES * len(FEATURES), np.float32) if done else self._observe()
        return obs, float(reward), done, False, {"regret": 1.0 - hv / self.scale, "row": row}


def meta_kwargs(seed: int) -> dict[str, Any]:
    """PPO hyperparameters of meta-training: one rollout is 64 steps of every environment;
    returns are final hypervolumes (no discount)."""
    return {"seed": seed, "verbose": 0, "device": "cpu", "gamma": 1.0, "gae_lambda": 0.95, "n_steps": 64,
            "batch_size": 128, "n_epochs": 4, "learning_rate": 3e-4, "ent_coef": 0.01, "clip_range": 0.2}  # fmt: skip


def code_version() -> str:
    """sha256 of the code that decides what a policy sees, computes and is trained on (the
    descriptor, the surrogate, the features, the network, the environment and the PPO settings):
    an agent's sidecar records it, and a cached agent trained by other code is not reused. Only
    that code, not this whole file: moving an import or editing a docstring elsewhere changes no
    policy and must not retire every trained agent."""
    parts = [inspect.getsource(f) for f in (_reach, describe, _matern52, GP, _hv_gains, _hv, candidate_features,
                                            _Scorer, _policy_class, CandidateEnv, meta_kwargs)]  # fmt: skip
    parts.append(repr((N_CANDIDATES, BANDS, DESCRIPTOR, FEATURES, FEATURE_BOUND)))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def proposer_version() -> str:
    """sha256 of how the strategy queries a policy (:func:`choose`, :class:`CandidateStrategy`):
    a benchmark's cached searches are keyed by it (a policy trained by the same code but queried
    otherwise proposes otherwise); trained agents are not (see :func:`code_version`)."""
    parts = [inspect.getsource(f) for f in (choose, CandidateStrategy)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def meta_train(tables: Sequence[str | Path], *, steps: int, seed: int = 0, deploy_len: int = 4096,
               out: str | Path | None = None, n_envs: int = 4) -> Any:  # fmt: skip
    """PPO meta-trained on searches of ``tables`` (:class:`CandidateEnv`); saved to ``out`` with a
    sidecar ``.json`` recording its provenance (tables, steps, seed, code version, sha256)."""
    from stable_baselines3 import PPO
    from stable_baselines3.common.vec_env import DummyVecEnv

    tasks = [TableTask(t, deploy_len=deploy_len) for t in tables]
    envs = DummyVecEnv([functools.partial(CandidateEnv, tasks) for _ in range(n_envs)])
    envs.seed(seed)
    start = time.perf_counter()
    torch.manual_seed(seed)
    agent = quiet(PPO(_policy_class(), envs, **meta_kwargs(seed)))
    agent.learn(total_timesteps=steps)
    if out is not None:
        out = Path(out).with_suffix(".zip")
        out.parent.mkdir(parents=True, exist_ok=True)
        agent.save(str(out))
        info = {"kind": "candidate-policy", "algo": "ppo", "tables": sorted(Path(t).stem for t in tables),
                "families": sorted({t.family for t in tasks}), "steps": steps, "seed": seed, "deploy_len": deploy_len,
                "code": code_version(), "seconds": round(time.perf_counter() - start, 1),
                "sha256": hashlib.sha256(out.read_bytes()).hexdigest()}  # fmt: skip
        out.with_suffix(".json").write_text(json.dumps(info, indent=1) + "\n")
    return agent


def provenance(path: str | Path) -> dict[str, Any] | None:
    """A saved policy's sidecar, or ``None`` when it is missing or does not match the file (its
    sha256) or this code (its version): such an agent must be trained again."""
    path = Path(path)
    side = path.with_suffix(".json")
    if not (path.is_file() and side.is_file()):
        return None
    info = json.loads(side.read_text())
    if info.get("sha256") != hashlib.sha256(path.read_bytes()).hexdigest() or info.get("code") != code_version():
        return None
    return info


def family_out_agent(
    tables: Sequence[str | Path],
    held_out: str | Sequence[str],
    *,
    seed: int,
    steps: int,
    folder: str | Path,
    deploy_len: int = 4096,
) -> Path:
    """The agent of the leave-one-family-out protocol for family ``held_out`` (or for several held
    out together: the sealed families): meta-trained with ``seed`` on every table of ``tables``
    recorded on another task, cached in ``folder``. A cached file is reused only when its
    provenance (:func:`provenance`) names exactly those tables, steps, seed, deployment length and
    this code; otherwise it is trained again. Raises if the agent's sidecar lists a table of a
    held-out family (so no scored agent ever saw its table)."""
    held = {held_out} if isinstance(held_out, str) else set(held_out)
    seen = sorted(str(t) for t in tables if recorded_task(t)[0] not in held)
    if not seen:
        raise ValueError(f"no table outside families {sorted(held)} to meta-train on")
    path = Path(folder) / f"family-out-{'+'.join(sorted(held))}-seed{seed}.zip"
    info = provenance(path)
    wanted = {"tables": sorted(Path(t).stem for t in seen), "steps": steps, "seed": seed, "deploy_len": deploy_len}
    if info is None or any(info.get(k) != v for k, v in wanted.items()):
        meta_train(seen, steps=steps, seed=seed, deploy_len=deploy_len, out=path)
        info = provenance(path)
    assert info is not None, f"{path}: no valid provenance after training"
    stems = {Path(t).stem: t for t in tables}
    leaked = [t for t in info["tables"] if t in stems and recorded_task(stems[t])[0] in held]
    if leaked:
        raise RuntimeError(f"{path} was trained on {leaked}, of the held-out families {sorted(held)}")
    return path


# -- the strategy ------------------------------------------------------------------------------------
def searched_task(context: StrategyContext) -> Any:
    """The task a search's configurations are read at: for a search of a recorded table
    (``--evaluator table:PATH``), the task and length the table was recorded at, as meta-training
    reads it (:class:`TableTask`), not the space's; otherwise the search's task."""
    from attn_search.engine.tasks import make_task

    space = context.space
    family: str | None = None
    params: dict[str, Any] = {}
    if context.evaluator.startswith("table:"):
        with contextlib.suppress(ValueError):  # (a table without the recorder's header: the space's task)
            family, params = recorded_task(context.evaluator[6:])
    if family is not None:
        return make_task(family, **params)
    return make_task(context.task or space.task, **(context.task_kwargs or dict(space.task_params)))


class CandidateStrategy:
    """``--strategy ppo``: asks the meta-trained candidate policy for each proposal (a
    :class:`~attn_search.strategies.base.Strategy`; see the module docstring)."""

    name = "ppo"

    def __init__(self, context: StrategyContext) -> None:
        self.context = context
        space = context.space
        self.space = space
        self.rng = np.random.default_rng(context.seed)
        given = context.options.get("agent")
        self.path = Path(given) if given and given != "none" else SHIPPED
        usable = given != "none" and self.path.is_file()  # (--agent none: the untrained acquisition)
        self.info = provenance(self.path) if usable else None
        try:
            self.policy = load_policy(self.path) if usable else None
        except RuntimeError as exc:  # a policy saved by other code: its network has other shapes
            raise RuntimeError(
                f"--agent {self.path}: this policy does not fit this version of attn_search ({str(exc).splitlines()[0]}): "
                "meta-train it again (`make agent` for the shipped one) or pass --agent none"
            ) from exc
        self.seen_x: list[np.ndarray] = []
        self.seen_acc: list[float] = []
        self.front: list[tuple[float, float]] = []
        self.tried: set[str] = set()
        self.pending: list[str] = []  # proposals out, not yet told
        self.table = context.evaluator[6:] if context.evaluator.startswith("table:") else None
        task = searched_task(context)
        self.seq_len, self.n_classes = task.seq_len, task.n_classes
        self.count_len = space.target_len or self.seq_len
        self.metric = space.metrics[1] if len(space.metrics) > 1 else M.FLOPS  # analytic (check_strategy)
        self._rows: list[tuple[dict[str, Any], AttentionConfig, float]] | None = None
        self.proposals = 0

    def start(self, history: Sequence[tuple[dict[str, Any], Outcome]]) -> str | None:
        for values, outcome in history:  # a resumed search: what is known already
            self.tell(values, outcome)
        if self.policy is None:
            return (
                "  ppo: no meta-trained policy (--agent none or none shipped): proposing by the untrained acquisition"
            )
        seen = ", ".join(self.info.get("families", [])) if self.info else "unknown tables"
        return f"  ppo: the candidate policy {self.path.name}, meta-trained on {seen}"

    # candidates ---------------------------------------------------------------------------------
    def _draw(self) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for p in self.space.params:
            if not p.active(values):
                continue
            if p.kind == "categorical":
                values[p.name] = p.choices[int(self.rng.integers(len(p.choices)))]
            else:
                lo, hi = float(p.low), float(p.high)  # type: ignore[arg-type]
                u = self.rng.random()
                v = math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo))) if p.log else lo + u * (hi - lo)
                values[p.name] = round(v) if p.kind == "int" else v
        return values

    def _candidates(self) -> list[tuple[dict[str, Any], AttentionConfig, float]]:
        if self.table is not None:
            if self._rows is None:
                from attn_search.search.evaluators import TableEvaluator

                lookup = TableEvaluator(self.table, self.space)
                compute = self.space.metrics[1]
                self._rows = [(dict((k, v) for k, v in key if v is not None), self.space.make_config(
                    dict((k, v) for k, v in key if v is not None), seed=self.context.seed), row[compute])
                    for key, row in lookup.rows.items()]  # fmt: skip
            left = [r for r in self._rows if self._key(r[1]) not in self.tried | set(self.pending)]
            pick: list[int] = (
                [int(i) for i in self.rng.choice(len(left), size=min(N_CANDIDATES, len(left)), replace=False)]
                if left
                else []
            )
            return [left[i] for i in pick]
        out: list[tuple[dict[str, Any], AttentionConfig, float]] = []
        for _ in range(20 * N_CANDIDATES):
            if len(out) == N_CANDIDATES:
                break
            values = self._draw()
            try:
                config = self.space.make_config(values, seed=self.context.seed)
            except ValueError:
                continue
            if self._key(config) in self.tried | set(self.pending):
                continue
            out.append((values, config, self._cost(config)))
        return out

    def _cost(self, config: AttentionConfig) -> float:
        """The search's compute objective (analytic: ``flops``, ``attn_flops``, ``attn_tile_flops``) at the
        length it is counted at."""
        return analytic_compute(self.metric, config, seq_len=self.count_len, n_classes=self.n_classes)

    @staticmethod
    def _key(config: AttentionConfig) -> str:
        return json.dumps(config.replace(seed=0).to_dict(), sort_keys=True)

    def _cost_bounds(self) -> tuple[float, float]:
        if not hasattr(self, "_bounds"):
            if self.table is not None:
                costs = [c for _, _, c in self._candidates_all()]
            else:
                costs = [self._cost(self.space.make_config(self._draw(), seed=0)) for _ in range(256)]
            self._bounds = (min(costs), max(costs))
        return self._bounds

    def _candidates_all(self) -> list[tuple[dict[str, Any], AttentionConfig, float]]:
        self._candidates()
        assert self._rows is not None
        return self._rows

    def _norm_cost(self, c: float) -> float:
        lo, hi = self._cost_bounds()
        return float(np.clip((c - lo) / max(hi - lo, 1e-12), 0.0, 1.0))

    # ask and tell -------------------------------------------------------------------------------
    def ask(self) -> dict[str, Any] | None:
        cands = self._candidates()
        if not cands:
            return None
        desc = np.stack([describe(c, self.seq_len) for _, c, _ in cands])
        costs = np.array([self._norm_cost(c) for _, _, c in cands])
        used = len(self.seen_acc) / max(1, self.context.trials)
        feats = candidate_features(desc, costs, np.array(self.seen_x).reshape(-1, len(DESCRIPTOR)),
                                   np.array(self.seen_acc), np.array(self.front).reshape(-1, 2), used)  # fmt: skip
        index = choose(self.policy, feats, self.rng) if self.policy is not None else int(np.argmax(feats[:, GAIN_UCB]))
        values, config, _ = cands[index]
        self.pending.append(self._key(config))
        self.proposals += 1
        return dict(values)

    def tell(self, values: dict[str, Any], outcome: Outcome) -> None:
        state, metrics = outcome.state, outcome.metrics
        try:
            config = self.space.make_config(values, seed=self.context.seed)
        except ValueError:
            return
        key = self._key(config)
        if key in self.pending:
            self.pending.remove(key)
        self.tried.add(key)
        if state not in (M.COMPLETE, M.PRUNED) or not metrics or M.ACCURACY not in metrics:
            return
        acc = float(metrics[M.ACCURACY])
        cost = metrics.get(self.space.metrics[1]) if len(self.space.metrics) > 1 else None
        if math.isnan(acc):
            return
        self.seen_x.append(describe(config, self.seq_len))
        self.seen_acc.append(acc)
        if state == M.COMPLETE and cost is not None and not math.isnan(float(cost)) and float(cost) > 0:
            self.front.append((acc, self._norm_cost(float(cost))))

    def close(self) -> None:
        pass


def regret_of(points: Sequence[tuple[float, float]], best: float) -> float:
    """``1 - HV / best`` of (accuracy, normalised cost) points."""
    return 1.0 - (_hv(np.asarray(points, dtype=float)) if len(points) else 0.0) / best
