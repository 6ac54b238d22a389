"""The candidate policy (``--strategy ppo``): descriptors, surrogate, policy, meta-training
provenance and the family-out guard, and searches on spaces it was never trained on."""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from gymnasium.utils.env_checker import check_env

from attn_search import AttentionConfig
from attn_search.strategies import candidates as C

ROOT = Path(__file__).resolve().parent.parent
TINY = str(Path(__file__).parent / "data" / "tiny.yaml")


def small_table(tmp: Path, name: str, family_of: str) -> Path:
    """A 40-row slice of a shipped table (its header names the task), for fast meta-training."""
    src = ROOT / "tables" / f"{family_of}.csv"
    lines = src.read_text().splitlines(keepends=True)
    head = [line for line in lines if line.startswith("#")]
    frame = pd.read_csv(src, comment="#").iloc[::8].head(40)
    out = tmp / f"{name}.csv"
    out.write_text("".join(head) + frame.to_csv(index=False))
    return out


def untrained_policy_and_features(tmp: Path) -> tuple[object, np.ndarray]:
    """An untrained candidate policy and the features of its env's candidates after 3 trials."""
    from stable_baselines3 import PPO

    task = C.TableTask(small_table(tmp, "delay", "delay-64"))
    env = C.CandidateEnv([task], lengths=("task",))
    agent = PPO(C._policy_class(), env, seed=0, device="cpu", n_steps=8, batch_size=8)
    obs, _ = env.reset(seed=0)
    for _ in range(3):
        obs, *_ = env.step(int(env.action_space.sample()))
    return agent, obs.reshape(C.N_CANDIDATES, -1)


def test_descriptors_name_what_a_mask_computes() -> None:
    """Two configurations whose masks are identical describe alike (BigBird(32, 4, 3) keeps every
    causal entry at L=256, as dense does); reach that differs shows in the bands it covers."""
    dense = AttentionConfig(pattern="dense")
    bigbird = AttentionConfig(pattern="bigbird", block_size=32, n_global=4, n_random=3)
    assert np.allclose(C.describe(dense, 256), C.describe(bigbird, 256))
    window = C.describe(AttentionConfig(pattern="window", window=8), 256)
    reach = {name: v for name, v in zip(C.DESCRIPTOR, window, strict=True)}
    assert reach["reach_1"] == 1.0 and reach["reach_8"] == 0.0 and reach["density"] < 0.07
    strided = dict(zip(C.DESCRIPTOR, C.describe(AttentionConfig(pattern="strided", stride=16), 256), strict=True))
    assert 0 < strided["reach_32"] < 0.2 and strided["reach_16"] > 0  # every 16th offset beyond the band
    longformer = dict(zip(C.DESCRIPTOR, C.describe(AttentionConfig(pattern="longformer", window=8), 256), strict=True))
    assert longformer["global"] == 1.0 and reach["global"] == 0.0


def test_the_surrogate_interpolates_what_it_saw_and_is_unsure_far_from_it() -> None:
    rng = np.random.default_rng(0)
    x = rng.random((12, 4))
    y = x[:, 0] * 0.5 + 0.2
    gp = C.GP(x, y)
    mean, sd = gp.predict(x)
    assert np.abs(mean - y).max() < 0.02 and sd.max() < 0.05
    far_mean, far_sd = gp.predict(x + 5.0)
    assert far_sd.min() > 5 * sd.max()
    assert np.abs(far_mean - y.mean()).max() < 0.05  # back to the prior mean


def test_front_gains_are_the_hypervolume_each_candidate_adds() -> None:
    """The policy's gain features, computed for every candidate at once, equal the normalised
    hypervolume of the front with the candidate minus without it (:func:`C._hv`, one candidate at a
    time): candidates the front dominates gain nothing, ties in cost and candidates outside
    ``[0, 1]`` included."""
    rng = np.random.default_rng(3)
    for n in (0, 1, 4, 25):
        front = np.column_stack([rng.random(n), np.round(rng.random(n), 1)])  # rounded: ties in cost
        acc = rng.random(40) * 1.2 - 0.1
        cost = np.concatenate([front[:3, 1], [0.0, 1.0], rng.random(40)])[:40]  # some at a front point's cost
        gains = C._hv_gains(front, acc, cost)
        base = C._hv(front)
        one_by_one = [
            C._hv(np.vstack([front, [[min(max(a, 0), 1), c]]])) - base for a, c in zip(acc, cost, strict=True)
        ]
        assert np.allclose(gains, one_by_one, atol=1e-12)
        assert (gains >= -1e-12).all()
    dominated = C._hv_gains(np.array([[0.9, 0.1]]), np.array([0.8, 0.95]), np.array([0.5, 0.5]))
    assert dominated[0] == 0.0 and dominated[1] > 0.0


def test_the_surrogate_stays_unsure_after_configurations_that_all_scored_alike() -> None:
    """Twelve configurations near chance (spread 0.003) must not convince the surrogate that
    nothing untried can do better: far from them its uncertainty is the prior's floor, so a distant
    candidate's optimistic accuracy (mean + 2 sd) clears the best seen by a margin. With the spread
    as the prior's amplitude it cleared it by 0.006, and held-out selective copy at L=4096 never
    left its cheap windows (regret 0.29 from trial 5 to 50)."""
    rng = np.random.default_rng(0)
    x = rng.random((12, 4))
    y = 0.07 + 0.003 * rng.standard_normal(12)
    mean, sd = C.GP(x, y).predict(x + 5.0)
    assert sd.min() >= 0.9 * C.GP.SD_FLOOR
    assert (mean + 2 * sd - y.max()).min() > 0.15


def test_the_policy_is_queried_as_it_was_trained_by_sampling(tmp_path: Path) -> None:
    """With a generator the strategy draws from the policy's distribution, as PPO acted in
    meta-training (its argmax is a behaviour it was never trained on: 3 of 5 held-out agents
    repeated one cheap corner for 45 trials); the draws follow the softmax of its logits, and the
    same generator seed gives the same picks."""
    agent, feats = untrained_policy_and_features(tmp_path)
    with torch.no_grad():
        logits = agent.policy.mlp_extractor.forward_actor(torch.as_tensor(feats.reshape(1, -1)))[0].double()
    probs = torch.softmax(logits, 0).numpy()
    rng = np.random.default_rng(5)
    picks = np.array([C.choose(agent, feats, rng) for _ in range(2000)])
    freq = np.bincount(picks, minlength=C.N_CANDIDATES) / len(picks)
    assert np.abs(freq - probs).max() < 0.05
    assert len(set(picks.tolist())) > 1  # not the argmax every time
    again = [C.choose(agent, feats, np.random.default_rng(5)) for _ in range(3)]
    assert again == [picks[0]] * 3
    assert C.choose(agent, feats) == int(np.argmax(logits.numpy()))  # no generator: the most likely


def test_the_policy_scores_candidates_whatever_their_order(tmp_path: Path) -> None:
    """One network scores each candidate: permuting the candidates permutes the logits; an
    untrained policy prefers the candidate with the largest optimistic front gain."""
    agent, feats = untrained_policy_and_features(tmp_path)
    perm = np.random.default_rng(1).permutation(C.N_CANDIDATES)
    scorer = agent.policy.mlp_extractor
    with torch.no_grad():
        a = scorer.forward_actor(torch.as_tensor(feats.reshape(1, -1)))[0]
        b = scorer.forward_actor(torch.as_tensor(feats[perm].reshape(1, -1)))[0]
    torch.testing.assert_close(a[perm], b)
    assert feats[C.choose(agent, feats), C.GAIN_UCB] == feats[:, C.GAIN_UCB].max()  # (ties: any of them)


def test_the_candidate_env_passes_the_checker_and_is_deterministic(tmp_path: Path) -> None:
    task = C.TableTask(small_table(tmp_path, "ngram", "ngram-64"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_env(C.CandidateEnv([task], lengths=("task",)), skip_render_check=True)
    rows = []
    for _ in range(2):
        env = C.CandidateEnv([task], lengths=("task",))
        env.reset(seed=3)
        rows.append([env.step(0)[4]["row"] for _ in range(5)])
    assert rows[0] == rows[1] and len(set(rows[0])) == 5  # no row proposed twice


def test_provenance_records_the_training_and_refuses_a_changed_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tables = [small_table(tmp_path, "delay", "delay-64"), small_table(tmp_path, "ngram", "ngram-64")]
    out = tmp_path / "agent.zip"
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    C.meta_train(tables, steps=128, seed=3, deploy_len=128, out=out, n_envs=2)
    assert not list(temp.glob("SB3-*"))  # (SB3's default logger leaves an empty SB3-<date> folder per run)
    info = C.provenance(out)
    assert info is not None
    assert info["tables"] == ["delay", "ngram"] and info["families"] == ["delay", "ngram"]
    assert info["steps"] == 128 and info["seed"] == 3 and info["code"] == C.code_version()
    tampered = tmp_path / "tampered.zip"
    shutil.copy(out, tampered)
    shutil.copy(out.with_suffix(".json"), tampered.with_suffix(".json"))
    with open(tampered, "ab") as fh:
        fh.write(b"\0")
    assert C.provenance(tampered) is None
    side = json.loads(out.with_suffix(".json").read_text())
    out.with_suffix(".json").write_text(json.dumps({**side, "code": "0" * 16}))
    assert C.provenance(out) is None  # trained by other code: not reused


def test_a_family_out_agent_never_saw_its_family(tmp_path: Path) -> None:
    """The agent scored on a family is trained on the other families only; a cached file that does
    not match (planted with the held-out table in its sidecar) is trained again, not reused."""
    tables = [small_table(tmp_path, "delay", "delay-64"), small_table(tmp_path, "ngram", "ngram-64"),
              small_table(tmp_path, "mqar", "mqar-64")]  # fmt: skip
    folder = tmp_path / "agents"
    path = C.family_out_agent(tables, "delay", seed=0, steps=64, folder=folder, deploy_len=128)
    info = C.provenance(path)
    assert info is not None and info["tables"] == ["mqar", "ngram"] and "delay" not in info["families"]
    stamp = path.stat().st_mtime_ns
    assert C.family_out_agent(tables, "delay", seed=0, steps=64, folder=folder, deploy_len=128) == path
    assert path.stat().st_mtime_ns == stamp  # a matching cached agent is reused
    side = path.with_suffix(".json")
    side.write_text(json.dumps({**json.loads(side.read_text()), "tables": ["delay", "mqar", "ngram"]}))
    C.family_out_agent(tables, "delay", seed=0, steps=64, folder=folder, deploy_len=128)
    again = C.provenance(path)
    assert again is not None and again["tables"] == ["mqar", "ngram"]
    # several families held out at once (the sealed ones): trained on none of them
    both = C.family_out_agent(tables, ["ngram", "delay"], seed=0, steps=64, folder=folder, deploy_len=128)
    info = C.provenance(both)
    assert both.name == "family-out-delay+ngram-seed0.zip" and info is not None and info["tables"] == ["mqar"]


@pytest.mark.parametrize(
    "space",
    [TINY, pytest.param("full", marks=pytest.mark.slow)],  # (the full space's search: 16 s)
    ids=["custom-yaml", "full"],
)
def test_ppo_searches_a_space_it_was_not_trained_on_with_the_shipped_policy(
    tmp_path: Path, space: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from attn_search.report.outputs import load_run
    from attn_search.search.loop import SearchOptions, run_search

    assert C.SHIPPED.is_file() and C.provenance(C.SHIPPED) is not None, "make agent"
    out = tmp_path / "run"
    generators = []
    choose = C.choose
    monkeypatch.setattr(
        C, "choose", lambda policy, feats, rng=None: generators.append(rng) or choose(policy, feats, rng)
    )
    run_search(SearchOptions(space=space, strategy="ppo", trials=7, steps=2, pruner="none", confirm=0,
                             out=str(out)))  # fmt: skip
    # the policy was asked for each of its proposals and drew with the search's generator (not its argmax)
    assert generators and all(isinstance(g, np.random.Generator) for g in generators)
    said = capsys.readouterr().out
    assert "the candidate policy candidate-ppo.zip, meta-trained on" in said and "untrained" not in said
    study = load_run(out)[0]
    ran = [t for t in study.trials if t.state.is_finished()]
    by = [t.user_attrs.get("proposed_by") for t in ran]
    # the learned head where the space can build it (all 5 on full, none on the tiny YAML), then the policy
    heads = 5 if space == "full" else 0
    assert len(ran) == 7 and by == ["ppo-head"] * heads + ["ppo"] * (7 - heads)
    assert len({json.dumps(t.params, sort_keys=True) for t in ran}) == 7


def test_the_policy_sees_the_same_costs_under_either_flops_where_width_and_depth_are_fixed(tmp_path: Path) -> None:
    """The candidate policy weighs candidates by the search's own compute objective, normalised over
    the space. On the sparse space (width and depth fixed) attention FLOPs and the whole model's
    differ by a constant, so the policy sees the same costs under either; on the full space, where
    width and depth vary, they rank candidates differently, and the strategy counts the one searched."""
    from attn_search.engine.cost import analytic_compute
    from attn_search.search.space import load_space
    from attn_search.strategies.base import StrategyContext

    def costs(name: str, compute: str) -> tuple[list[float], list[float]]:
        space = load_space(name).with_compute(compute)
        if space.target_len:  # (1024, not 4096: counting 4096^2 masks of ~600 drawn configurations takes 40 s)
            space = dataclasses.replace(space, target_len=1024)
        context = StrategyContext(space=space, seed=0, trials=10, slots=1, run_dir=tmp_path, resume=False,
                                  compute=compute, options={"agent": "none"})  # fmt: skip
        strategy = C.CandidateStrategy(context)
        configs = [space.make_config(strategy._draw(), seed=0) for _ in range(40)]
        assert [strategy._cost(c) for c in configs] == [
            analytic_compute(space.metrics[1], c, seq_len=space.target_len or 256, n_classes=strategy.n_classes)
            for c in configs
        ]
        return [strategy._norm_cost(strategy._cost(c)) for c in configs], [float(c.d_model) for c in configs]

    whole, _ = costs("sparse", "flops")
    attention, _ = costs("sparse", "attn_flops")
    assert np.allclose(whole, attention, atol=1e-9) and np.ptp(attention) > 0.5
    whole, widths = costs("full", "flops")
    attention, _ = costs("full", "attn_flops")
    assert len(set(widths)) > 1 and not np.allclose(whole, attention, atol=0.05)


def test_a_table_counts_its_deployment_cost_in_tiles_where_asked() -> None:
    """``benchmarks/family_out.py --deploy-compute attn_tile_flops`` scores the sparse space's own
    objective at L=4096: a table's deployment costs are then its rows' 128-tiles, where every stride
    touches all of dense's tiles though it keeps a fraction of its entries."""
    from attn_search.engine.cost import model_attention_tile_flops

    path = ROOT / "tables" / "mqar-64.csv"
    entries = C.TableTask(path, deploy_len=4096)
    tiles = C.TableTask(path, deploy_len=4096, deploy_metric="attn_tile_flops")
    assert [model_attention_tile_flops(c, seq_len=4096) for c in tiles.configs] == list(tiles.costs["deploy"])
    dense = [i for i, c in enumerate(tiles.configs) if c.pattern == "dense"]
    strided = [i for i, c in enumerate(tiles.configs) if c.pattern == "strided"]
    assert dense and strided
    assert all(tiles.costs["deploy"][i] == tiles.costs["deploy"][dense[0]] for i in strided)
    assert all(entries.costs["deploy"][i] < entries.costs["deploy"][dense[0]] for i in strided)
    assert np.array_equal(tiles.costs["task"], entries.costs["task"])  # (the task's length: as recorded)
