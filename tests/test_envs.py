"""The gymnasium environment: checkers, determinism, reward contract, vectorisation, recording."""

from __future__ import annotations

import dataclasses
import tempfile
import warnings
from pathlib import Path

import gymnasium as gym
import numpy as np
import pandas as pd
import pytest
import torch
from attn_search.envs import ENV_ID
from attn_search.envs.attention_search import AttentionSearchEnv
from gymnasium.utils.env_checker import check_env as gym_check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env
from stable_baselines3.common.env_util import make_vec_env

import attn_search  # noqa: F401  (registers the env id)
from attn_search.engine.cost import model_flops
from attn_search.engine.metrics import ENTRY_COUNTED
from attn_search.engine.tasks import make_task
from attn_search.record import grid_configs, parse_grid, record
from attn_search.report.outputs import row_config
from attn_search.search.evaluators import recorded_compute_length, restrict_to_evaluator
from attn_search.search.space import load_space
from attn_search.strategies.candidates import TableTask
from attn_search.strategies.head import head_length

TINY = str(Path(__file__).parent / "data" / "tiny.yaml")


@pytest.fixture(scope="module")
def table(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("table") / "tiny.csv"
    return record(TINY, out, bins=2, steps=4, quiet=True, argv=["--space", "tiny.yaml", "--bins", "2"])


def make(table: Path, **kw: object) -> AttentionSearchEnv:
    return AttentionSearchEnv(TINY, f"table:{table}", budget=6, **kw)  # type: ignore[arg-type]


def test_recorded_table_covers_the_grid_once(table: Path) -> None:
    space = load_space(TINY)
    configs = grid_configs(space, bins=2)
    df = pd.read_csv(table, comment="#")
    assert len(df) == len(configs) == 2 * (1 + 2 + 2 * 1) * 2  # heads x (dense, window x2, longformer x2) x lr
    assert (df["state"] == "complete").all()
    assert (
        table.read_text().startswith("# attn_search recorded table")
        and "# command: attn-search record" in table.read_text()
    )
    # every row keeps its learning curve: accuracy at each rung, the last one the row's accuracy
    for curve, acc in zip(df["curve"], df["accuracy"], strict=True):
        points = [tuple(map(float, item.split(":"))) for item in curve.split(";")]
        assert [s for s, _ in points] == [2.0, 4.0] and points[-1][1] == pytest.approx(acc, rel=1e-5)


def test_a_table_counts_compute_at_its_tasks_length_unless_told_and_a_search_of_it_at_that_length(
    table: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A space's target_len (the sparse space's 4096) must not leak into a recording: meta-training
    and replays read a table's compute at its task's length, as the shipped tables hold it, with the
    trial's own latency and memory (not a fresh model's forward pass at a target length). A table
    recorded at another length says so, and a search of it counts compute there (its ppo head too)."""
    from attn_search.engine import trainer

    space = dataclasses.replace(load_space(TINY), target_len=1024)  # a space that counts compute elsewhere
    spec = tmp_path / "tiny.yaml"
    spec.write_text(Path(TINY).read_text() + "target_len: 1024\n")
    grid = ["pattern=window", "n_heads=2", "lr=0.003"]
    with monkeypatch.context() as patched:

        def at_a_target_length(*args: object, **kwargs: object) -> None:
            raise AssertionError("a recording at the task's length measured figures at a target length")

        patched.setattr(trainer, "measure_at_length", at_a_target_length)
        plain = record(str(spec), tmp_path / "plain.csv", bins=2, steps=2, grid=grid, quiet=True)
    at = record(str(spec), tmp_path / "at.csv", bins=2, steps=2, grid=grid, target_len=2048, quiet=True)
    n_classes = make_task("mqar", seq_len=32, n_pairs=4, n_keys=8, n_values=8).n_classes
    for path, length in ((plain, 32), (at, 2048)):
        assert f"compute at L={length})" in path.read_text().splitlines()[0]
        assert recorded_compute_length(path) == length
        df = pd.read_csv(path, comment="#")
        assert len(df) == 2 and (df["state"] == "complete").all()
        for _, row in df.iterrows():
            assert row["flops"] == model_flops(row_config(row), seq_len=length, n_classes=n_classes)
    assert restrict_to_evaluator(space, f"table:{plain}").target_len is None
    searched = restrict_to_evaluator(space, f"table:{at}")
    assert searched.target_len == 2048
    assert head_length(searched, 32, 4096) == "deploy"  # 2048 is nearer 4096 than 32 on a log scale
    # meta-training reads every table's compute at its task's length (and at the deployment length)
    tasks = [TableTask(path, deploy_len=4096) for path in (plain, at)]
    assert np.array_equal(tasks[0].costs["task"], tasks[1].costs["task"])
    # a table whose header predates the length: its task's
    assert recorded_compute_length(table) == 32
    old = tmp_path / "old.csv"
    old.write_text(table.read_text().replace(", compute at L=32)", ")", 1))
    assert recorded_compute_length(old) == 32 and restrict_to_evaluator(space, f"table:{old}").target_len is None


def test_the_env_on_a_table_whose_rows_compute_the_same_tiles_counts_kept_entries() -> None:
    """The sparse space counts tiles; on the shipped tables (L=64, 128: one tile; sparse-smoke at
    L=256: the three causal tiles) every row computes the same tiles, so the env's compute range would
    be empty: it counts kept entries there, as a search does, and tiles where asked."""
    root = Path(__file__).resolve().parents[1] / "tables"
    for name in ("mqar-64", "selective_copy-128", "sparse-smoke"):
        env = AttentionSearchEnv("sparse", f"table:{root / name}.csv", budget=3)
        assert env.space.metrics == ["accuracy", "attn_flops"] and env.upper[1] > 2 * env.lower[1], name
    asked = AttentionSearchEnv("sparse", f"table:{root / 'mqar-64.csv'}", budget=3, compute="attn_tile_flops")
    assert asked.space.metrics == ["accuracy", "attn_tile_flops"] and asked.lower[1] == asked.upper[1]
    assert AttentionSearchEnv(TINY, "table:" + str(root / "sparse-smoke.csv"), budget=3).space.metrics[1] == "flops"


def test_env_checkers_pass_without_warnings(table: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gym_check_env(gym.make(ENV_ID, space=TINY, evaluator=f"table:{table}", budget=6).unwrapped)
        sb3_check_env(make(table), warn=True)


def test_registered_and_makeable(table: Path) -> None:
    env = gym.make(ENV_ID, space=TINY, evaluator=f"table:{table}", budget=3)
    obs, info = env.reset(seed=0)
    assert env.observation_space.contains(obs)


def rollout(env: AttentionSearchEnv, seed: int) -> list[tuple[list[float], float, bool]]:
    env.reset(seed=seed)
    env.action_space.seed(seed)
    steps = []
    done = False
    while not done:
        obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
        steps.append((obs.tolist(), reward, terminated))
        done = terminated or truncated
    return steps


def test_same_seed_same_rollout(table: Path) -> None:
    assert rollout(make(table), 7) == rollout(make(table), 7)
    assert rollout(make(table), 7) != rollout(make(table), 8)


def _area(points: list[tuple[float, float]]) -> float:
    """2-D hypervolume of (accuracy up, cost in [0, 1] down) points, reference (0, 1), by a sweep
    written here independently of attn_search.search.pareto."""
    total, best = 0.0, 0.0
    ordered = sorted(points, key=lambda p: p[1])
    for i, (acc, cost) in enumerate(ordered):
        best = max(best, acc)
        total += best * ((ordered[i + 1][1] if i + 1 < len(ordered) else 1.0) - cost)
    return total


def test_return_is_the_final_normalised_hypervolume(table: Path) -> None:
    """The episode's return is the hypervolume of the points it visited, computed here from the
    recorded rows with the env's bounds (so a reward that drifted from the front would show)."""
    env = make(table)
    env.reset(seed=0)
    total, info, steps, terminated, seen = 0.0, {}, 0, False, []
    acc_i = env.metrics.index("accuracy")
    cost_i = 1 - acc_i
    lo, hi = env.lower[cost_i], env.upper[cost_i]
    while not terminated:
        _, reward, terminated, truncated, info = env.step(env.action_space.sample())
        assert not truncated
        total += reward
        steps += 1
        m = info["metrics"]
        seen.append((m[env.metrics[acc_i]], min(max((m[env.metrics[cost_i]] - lo) / (hi - lo), 0.0), 1.0)))
    assert steps == 6
    assert info["hypervolume"] == pytest.approx(_area(seen), abs=1e-9)
    assert total == pytest.approx(_area(seen), abs=1e-9) and _area(seen) > 0
    assert set(info) >= {"config", "metrics", "values"}


def test_actions_decode_to_recorded_configs(table: Path) -> None:
    env = make(table)
    env.reset(seed=0)
    df = pd.read_csv(table, comment="#")
    for _ in range(5):
        _, _, _, _, info = env.step(env.action_space.sample())
        row = df[(df["pattern"] == info["config"]["pattern"]) & (df["n_heads"] == info["config"]["n_heads"])]
        assert info["metrics"]["accuracy"] in set(row["accuracy"])


def test_vectorised(table: Path) -> None:
    vec = make_vec_env(lambda: make(table), n_envs=3, seed=0)
    obs = vec.reset()
    assert obs.shape == (3, *make(table).observation_space.shape)
    obs, rewards, dones, infos = vec.step(np.stack([vec.action_space.sample() for _ in range(3)]))
    assert rewards.shape == (3,) and len(infos) == 3


def test_grid_overrides_are_checked() -> None:
    space = load_space(TINY)
    assert parse_grid(["lr=0.002,0.005"], space) == {"lr": [0.002, 0.005]}
    with pytest.raises(ValueError, match="outside lr's range"):
        parse_grid(["lr=5"], space)
    with pytest.raises(ValueError, match="use NAME=v1,v2"):
        parse_grid(["heads=2"], space)
    pinned = grid_configs(space, bins=3, overrides=parse_grid(["n_heads=2", "lr=0.003"], space))
    assert {c["n_heads"] for c in pinned} == {2} and {c["lr"] for c in pinned} == {0.003}


@pytest.mark.parametrize("strategy", ["ppo-grid", "a2c"])
def test_rl_strategy_searches_with_real_training(
    tmp_path: Path, strategy: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from attn_search.search.loop import SearchOptions, run_search

    out = tmp_path / "run"
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    summary = run_search(SearchOptions(space=TINY, strategy=strategy, trials=5, steps=4, out=str(out), quiet=True))
    assert summary.n_finished == 5
    assert not list(temp.glob("SB3-*"))  # the agent learned without leaving SB3's default log folder
    trials = pd.read_csv(out / "trials.csv")
    assert len(trials[trials["state"] != "interrupted"]) == 5
    for name in ("pareto.csv", "best_config.yaml", "report.html", "agent.zip"):
        assert (out / name).is_file(), name


@pytest.mark.slow  # about 15 s of PPO training
def test_ppo_pretrained_on_a_table_then_loaded_from_zip(tmp_path: Path, table: Path) -> None:
    from attn_search.search.loop import SearchOptions, run_search

    first = tmp_path / "first"
    run_search(
        SearchOptions(
            space=TINY,
            strategy="ppo-grid",
            trials=3,
            steps=4,
            out=str(first),
            pretrain=str(table),
            pretrain_steps=200,
            quiet=True,
        )
    )
    again = tmp_path / "again"
    summary = run_search(
        SearchOptions(
            space=TINY,
            strategy="ppo-grid",
            trials=3,
            steps=4,
            out=str(again),
            agent=str(first / "agent.zip"),
            pretrain=str(table),
            pretrain_steps=200,
            quiet=True,
        )
    )
    assert summary.n_finished == 3 and (again / "agent.zip").is_file()
    # on the table's grid: every proposal is a recorded configuration
    df = pd.read_csv(table, comment="#")
    proposed = pd.read_csv(again / "trials.csv")
    assert set(proposed["lr"].round(8)) <= set(df["lr"].round(8))


def test_rl_strategy_errors(tmp_path: Path) -> None:
    from attn_search.search.loop import SearchOptions, UsageError, run_search

    with pytest.raises(UsageError, match="needs --compute flops, attn_flops, attn_tile_flops or params"):
        run_search(
            SearchOptions(space=TINY, strategy="ppo-grid", compute="latency", out=str(tmp_path / "a"), quiet=True)
        )
    with pytest.raises(UsageError, match="apply to --strategy ppo, ppo-grid or a2c"):
        run_search(SearchOptions(space=TINY, strategy="tpe", agent="x.zip", out=str(tmp_path / "b"), quiet=True))


@pytest.mark.parametrize("strategy", ["tpe", "random", "ppo"])
def test_table_evaluator_serves_every_strategy(tmp_path: Path, table: Path, strategy: str) -> None:
    from attn_search.search.loop import SearchOptions, run_search

    out = tmp_path / "run"
    summary = run_search(
        SearchOptions(space=TINY, strategy=strategy, trials=6, evaluator=f"table:{table}", out=str(out), quiet=True)
    )
    assert summary.n_complete == 6
    rows = pd.read_csv(table, comment="#")
    trials = pd.read_csv(out / "trials.csv")
    assert (trials["device"] == "table").all()
    for _, t in trials.iterrows():  # every result is the recorded one for that configuration
        same = rows[
            (rows["pattern"] == t["pattern"])
            & (rows["n_heads"] == t["n_heads"])
            & (rows["lr"].round(8) == round(t["lr"], 8))
        ]
        if t["pattern"] != "dense":
            same = same[same["window"] == t["window"]]
        assert t["accuracy"] in set(same["accuracy"])


def test_the_observation_carries_the_episodes_history(table: Path) -> None:
    """Per dimension and bin: how often it was tried (fraction of the budget) and the best accuracy
    it led to relative to the episode's best, so a memoryless policy sees its search so far."""
    env = make(table)
    obs, _ = env.reset(seed=0)
    k, m, n_bins = len(env.grids), len(env.metrics), int(env.action_space.nvec.sum())
    assert obs.shape == (k + m + 3 + 2 * n_bins,) and not obs[k + m + 3 :].any()
    first, second = np.zeros(k, dtype=np.int64), np.zeros(k, dtype=np.int64)
    second[1] = 1  # the second dimension (pattern) at its second value, the rest as the first trial
    obs, *_ = env.step(first)
    obs, _, _, _, info = env.step(second)
    tried, best = obs[k + m + 3 : k + m + 3 + n_bins], obs[k + m + 3 + n_bins :]
    offsets = np.concatenate([[0], np.cumsum(env.action_space.nvec)[:-1]])
    assert tried[offsets[0]] == pytest.approx(2 / 6) and tried[offsets[1]] == pytest.approx(1 / 6)
    assert tried[offsets[1] + 1] == pytest.approx(1 / 6) and tried.sum() == pytest.approx(2 * k / 6)
    assert best.max() == pytest.approx(1.0) and best[offsets[0]] == pytest.approx(1.0)  # both trials chose it
    assert env.observation_space.contains(obs)


def test_meta_training_on_a_table_beats_the_untrained_agent_there(table: Path) -> None:
    from stable_baselines3 import PPO

    from attn_search.strategies.agent import meta_train

    space = load_space(TINY)

    def mean_return(agent: PPO) -> float:
        torch.manual_seed(0)  # the policy samples from torch's global generator: same draws for both
        env = AttentionSearchEnv(TINY, f"table:{table}", budget=4)
        total = 0.0
        for episode in range(20):
            obs, _ = env.reset(seed=episode)
            done = False
            while not done:
                action, _ = agent.predict(obs, deterministic=False)
                obs, reward, done, _, _ = env.step(action)
                total += reward
        return total / 20

    untrained = PPO("MlpPolicy", AttentionSearchEnv(TINY, f"table:{table}", budget=4), seed=0, device="cpu")
    trained = meta_train([table], space, steps=3000, budgets=(4,), seed=0)
    before, after = mean_return(untrained), mean_return(trained)
    assert after > before + 0.01, (before, after)


# -- the shipped, meta-trained agent ------------------------------------------------------------
SHIPPED_SPACES = ("sparse", "dense", "full")


@pytest.mark.slow  # about 30 s: the agent over every space
def test_the_shipped_agent_proposes_valid_configurations_of_every_space_it_fits(tmp_path: Path) -> None:
    """The agent meta-trained on the shipped tables (package data) is the default of ``--strategy
    ppo`` where it fits: it loads, says so, and proposes configurations of the space on its grid;
    ``--resume`` continues it (more environment steps, the same grid)."""
    from attn_search.report.outputs import load_run
    from attn_search.search.loop import SearchOptions, run_search
    from attn_search.strategies.agent import agent_info, grid_for, shipped_agent

    fits = {name: shipped_agent("ppo-grid", load_space(name)) is not None for name in SHIPPED_SPACES}
    assert fits["sparse"], "the shipped agent must fit the sparse space (make agent)"
    # trained against flops, it serves the sparse space's attn_flops (a constant apart there), not latency
    sparse = load_space("sparse")
    assert shipped_agent("ppo-grid", sparse, "attn_flops") == shipped_agent("ppo-grid", sparse, "flops")
    assert shipped_agent("ppo-grid", sparse, "latency") is None
    assert shipped_agent("ppo-grid", sparse, "attn_tile_flops") is None  # (tiles rank configurations otherwise)
    for name in [n for n, ok in fits.items() if ok]:
        space = load_space(name)
        path, info = shipped_agent("ppo-grid", space)  # type: ignore[misc]
        assert path.stat().st_size < 5e6 and info["tables"] and info["steps"] > 0
        out = tmp_path / name
        compute = None if space.metrics[1] in ENTRY_COUNTED else "attn_flops"  # (what the agent serves)
        opts = SearchOptions(space=name, strategy="ppo-grid", trials=3, steps=2, pruner="none", confirm=0, out=str(out),
                             compute=compute, quiet=True)  # fmt: skip
        assert run_search(opts).n_finished == 3
        grid = dict(zip([p.name for p in space.params], grid_for(space, info), strict=True))  # type: ignore[arg-type]
        study = load_run(out)[0]
        ran = [t for t in study.trials if "not run again" not in str(t.user_attrs.get("reason"))]  # (repeats are told)
        assert len(ran) == 3
        for trial in study.trials:  # proposed by the agent, on its grid, a valid configuration of the space
            assert trial.user_attrs.get("proposed_by") == "ppo-grid"
            for key, value in trial.params.items():
                assert any(value == pytest.approx(v) for v in grid[key]), (key, value, grid[key])
            space.make_config(trial.params)
        assert agent_info(out / "agent.zip") == info  # the run remembers the agent's grid for --resume
        from stable_baselines3 import PPO

        before = PPO.load(out / "agent.zip", device="cpu").num_timesteps
        assert before > info["steps"]  # the shipped agent's steps and this search's
        assert run_search(dataclasses.replace(opts, trials=5, resume=True)).n_finished == 5
        assert PPO.load(out / "agent.zip", device="cpu").num_timesteps > before  # it went on learning
        again = load_run(out)[0]
        assert all(t.user_attrs.get("proposed_by") == "ppo-grid" for t in again.trials)
        assert {t.params["n_heads"] for t in again.trials} <= set(grid["n_heads"])


@pytest.mark.slow  # about 15 s: searches with the agent
def test_the_shipped_agent_is_announced_and_none_trains_from_scratch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from attn_search.search.loop import SearchOptions, run_search

    base = SearchOptions(space="sparse", strategy="ppo-grid", trials=2, steps=2, pruner="none", confirm=0,
                         out=str(tmp_path / "a"), compute="attn_flops")  # fmt: skip
    run_search(base)
    said = capsys.readouterr().out
    assert "the shipped agent sparse-ppo.zip, meta-trained on" in said and "searching its grid: n_heads 2/4/8" in said
    # the sparse space's own compute, tiles, is not what it was trained against: it says so and how
    run_search(dataclasses.replace(base, compute=None, out=str(tmp_path / "tiles")))
    said = capsys.readouterr().out
    assert "meta-trained against flops, another compute objective than this search's attn_tile_flops" in said
    assert "(--compute attn_flops uses it)" in said and "the shipped agent sparse-ppo.zip" not in said
    run_search(dataclasses.replace(base, agent="none", out=str(tmp_path / "b")))
    said = capsys.readouterr().out
    assert "ppo-grid: a new agent (0 environment steps so far)" in said and "shipped agent" not in said
    assert not (tmp_path / "b" / "agent.json").exists()
    # on a space with other parameters it starts untrained, in one line, and does not fail
    run_search(dataclasses.replace(base, space=TINY, out=str(tmp_path / "c")))
    said = capsys.readouterr().out
    lines = [line for line in said.splitlines() if "shipped ppo-grid agent" in line]
    assert len(lines) == 1 and "starts untrained" in lines[0]


def test_meta_train_command_writes_an_agent_that_searches_on_its_grid(tmp_path: Path, table: Path) -> None:
    from attn_search.cli import main
    from attn_search.search.loop import SearchOptions, UsageError, run_search
    from attn_search.strategies.agent import agent_info

    agent = tmp_path / "meta.zip"
    assert main(["meta-train", "--kind", "grid", "--space", TINY, "--tables", str(table), "--steps", "200", "--out",
                 str(agent)]) == 0  # fmt: skip
    info = agent_info(agent)
    assert info is not None and info["tables"] == [table.stem] and info["steps"] == 200
    assert info["grid"]["lr"] == sorted(set(pd.read_csv(table, comment="#")["lr"].round(6)))
    out = tmp_path / "run"
    run_search(
        SearchOptions(space=TINY, strategy="ppo-grid", trials=3, steps=2, agent=str(agent), out=str(out), quiet=True)
    )
    proposed = pd.read_csv(out / "trials.csv")
    assert set(proposed["lr"].round(6)) <= set(info["grid"]["lr"])  # the agent's grid, not the space's 5 bins
    # an agent made for other parameters, or a missing file, is refused before anything runs
    with pytest.raises(UsageError, match="meta-trained on other parameters"):
        run_search(
            SearchOptions(space="sparse", strategy="ppo-grid", agent=str(agent), out=str(tmp_path / "x"), quiet=True)
        )
    with pytest.raises(UsageError, match="no such file"):
        run_search(
            SearchOptions(space=TINY, strategy="ppo-grid", agent="nope.zip", out=str(tmp_path / "y"), quiet=True)
        )
    assert main(["meta-train", "--tables", "nope.csv", "--out", str(agent)]) == 2
