"""Search end to end, in process, on a space whose trials take a fraction of a second."""

from __future__ import annotations

import dataclasses
import html
import importlib.util
import io
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import yaml

from attn_search import AttentionConfig, Budget, build_model, load_config, make_task
from attn_search.backends import TrialRunner
from attn_search.engine.patterns import pattern_entries, pattern_mask, resolve_params
from attn_search.engine.trainer import PRESETS
from attn_search.export import export_run
from attn_search.report.outputs import rebuild
from attn_search.search.loop import SearchOptions, UsageError, run_search
from attn_search.search.space import load_space

TINY = str(Path(__file__).parent / "data" / "tiny.yaml")
OUTPUTS = [
    "trials.csv",
    "pareto.csv",
    "best_config.yaml",
    "pareto.png",
    "hypervolume.png",
    "pareto.html",
    "report.html",
]


def search(tmp_path: Path, **kw: object) -> tuple[Path, object]:
    out = tmp_path / "run"
    opts = SearchOptions(**{"space": TINY, "trials": 6, "steps": 6, "out": str(out), "quiet": True, **kw})  # type: ignore[arg-type]
    return out, run_search(opts)


@pytest.mark.parametrize("strategy", ["tpe", "nsga2"])  # every strategy: tests/test_contract.py
def test_a_search_with_real_training_produces_every_output(tmp_path: Path, strategy: str) -> None:
    out, summary = search(tmp_path, strategy=strategy)
    for name in OUTPUTS:
        assert (out / name).stat().st_size > 0, name
    trials = pd.read_csv(out / "trials.csv")
    assert len(trials) == 6 and set(trials["state"]) <= {"complete", "pruned", "failed"}
    assert summary.n_finished == 6  # type: ignore[attr-defined]
    front = pd.read_csv(out / "pareto.csv")
    assert len(front) >= 1 and (front["state"] == "complete").all()
    assert load_config(out / "best_config.yaml").pattern in ("dense", "window", "longformer")


def test_cmaes_is_single_objective(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"cmaes.*single objective.*--compute none"):
        search(tmp_path, strategy="cmaes")
    out, summary = search(tmp_path, strategy="cmaes", compute="none")
    assert summary.n_finished == 6  # type: ignore[attr-defined]


@pytest.mark.slow  # about 13 s: two searches
def test_same_seed_same_proposals(tmp_path: Path) -> None:
    a, _ = search(tmp_path / "a", seed=3, pruner="none")
    b, _ = search(tmp_path / "b", seed=3, pruner="none")
    cols = ["pattern", "n_heads", "window", "lr", "accuracy"]
    pd.testing.assert_frame_equal(pd.read_csv(a / "trials.csv")[cols], pd.read_csv(b / "trials.csv")[cols])


def test_constraints_keep_the_front_feasible(tmp_path: Path) -> None:
    task = make_task("mqar", seq_len=32, n_pairs=4, n_keys=8, n_values=8)
    from attn_search.engine.cost import model_flops

    dense = model_flops(AttentionConfig(d_model=16, pattern="dense"), seq_len=32, n_classes=task.n_classes)
    out, _ = search(tmp_path, max_flops=dense - 1, trials=8)
    front = pd.read_csv(out / "pareto.csv")
    assert (front["flops"] <= dense - 1).all()


def test_selection_rules(tmp_path: Path) -> None:
    out, _ = search(tmp_path, trials=8, pruner="none")
    trials = pd.read_csv(out / "trials.csv")
    done = trials[trials["state"] == "complete"]
    best_acc = load_config(export_run(out, fmt="yaml", select="max-accuracy", out=tmp_path / "a.yaml"))
    assert best_acc.lr in set(done.loc[done["accuracy"] == done["accuracy"].max(), "lr"])
    cheap = load_config(export_run(out, fmt="json", select="min-compute", out=tmp_path / "c.json"))
    assert cheap.lr in set(done.loc[done["flops"] == done["flops"].min(), "lr"])
    limit = float(done["flops"].median())
    under = yaml.safe_load(
        export_run(out, select=f"max-accuracy-under-flops={limit}", out=tmp_path / "u.yaml").read_text()
    )
    assert under["metrics"]["flops"] <= limit


def load_module(path: Path, name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # as `import` does (the exported file defines dataclasses)
    spec.loader.exec_module(module)
    return module


def assert_exported_matches(module: Any, config: AttentionConfig, task: Any, *, n: int) -> None:
    """The exported module's model, given our weights (``load_searched``), gives our outputs and
    gradients (it is another implementation: one model, no member axis, its own CPU path)."""
    ours = build_model(config, task).eval()
    theirs = module.build_model().eval()
    module.load_searched(theirs, ours.state_dict())
    x, _ = task.data("eval", n)
    out, ref = theirs(x), ours(x)
    assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()
    ref.square().mean().backward()
    out.square().mean().backward()
    ours_grad, their_grad = ours.blocks[0].attn.qkv.weight.grad[0], theirs.blocks[0].attn.qkv.weight.grad.T
    assert ours_grad.abs().max() > 1e-4 and torch.allclose(their_grad, ours_grad, rtol=1e-4, atol=1e-6)


def test_exported_python_module_matches_build_model(tmp_path: Path) -> None:
    out, _ = search(tmp_path, trials=4)
    module = load_module(export_run(out, fmt="python", out=tmp_path / "exported.py"), "exported")
    config = load_config(out / "best_config.yaml")
    task = make_task("mqar", seq_len=32, n_pairs=4, n_keys=8, n_values=8)
    assert_exported_matches(module, config, task, n=4)
    layer = module.SearchedAttention(16, 2)
    assert layer(torch.randn(2, 32, 16)).shape == (2, 32, 16)
    exported = (module.PATTERN, module.PARAMS)
    assert exported == (config.pattern, resolve_params(config.pattern, **config.pattern_params()))


@pytest.mark.parametrize(
    ("pattern", "seq_len"),
    [("dense", 48), ("window", 48), ("dilated", 48), ("strided", 200), ("bigbird", 200), ("longformer", 200)],
)
def test_exported_module_for_every_pattern(tmp_path: Path, pattern: str, seq_len: int) -> None:
    """Every pattern, at a length of one tile and of several, on both CPU paths: SDPA over the mask
    where most of the tile grid is kept (the default at these lengths), and the pattern's tile
    groups (forced)."""
    from attn_search.export import python_module

    config = AttentionConfig(d_model=16, n_heads=2, pattern=pattern, window=5, stride=4, block_size=8, n_random=2)
    task = make_task("mqar", seq_len=seq_len, n_pairs=4)
    path = tmp_path / f"m_{pattern}.py"
    path.write_text(python_module(config, vocab_size=task.vocab_size, n_classes=task.n_classes, max_len=seq_len))
    module = load_module(path, f"m_{pattern}")
    assert_exported_matches(module, config, task, n=2)
    if pattern == "dense":
        return
    kind = lambda m: m.blocks[0].attn._plan(seq_len, torch.device("cpu"))[2][0]  # noqa: E731
    assert kind(module.build_model()) == "masked"
    module.MAX_TILE_DENSITY = 1.0  # every grid on the tiles
    assert kind(module.build_model()) == "tiles"
    assert_exported_matches(module, config, task, n=2)


def test_the_export_is_a_small_module_that_needs_only_torch(tmp_path: Path) -> None:
    """The longest export (BigBird, whose rule carries its block table's code) stays under 400
    lines, and it runs in a Python where attn_search, numpy-based and search packages cannot be
    imported."""
    from attn_search.export import python_module

    config = AttentionConfig(d_model=16, n_heads=2, pattern="bigbird", block_size=8, n_random=2)
    path = tmp_path / "small.py"
    path.write_text(python_module(config, vocab_size=8, n_classes=4, max_len=64))
    assert len(path.read_text().splitlines()) < 400
    blocked = ["attn_search", "optuna", "gymnasium", "stable_baselines3", "ray", "pandas", "yaml", "scipy"]
    code = (f"import sys, runpy\nfor m in {blocked!r}: sys.modules[m] = None\n"
            f"ns = runpy.run_path({str(path)!r})\nimport torch\n"
            "print(tuple(ns['build_model']()(torch.zeros(2, 64, dtype=torch.long)).shape))")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == "(2, 64, 4)", done.stderr[-2000:]


@pytest.mark.parametrize("how", ["import", "importlib-unregistered", "runpy", "runpy-as-main"])
def test_the_export_loads_however_a_user_loads_a_file(
    tmp_path: Path, how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """By ``import``, by importlib's spec_from_file_location + exec_module without registering the
    module (its dataclasses once raised AttributeError there), and by ``runpy.run_path`` (as
    IPython's ``%run`` does, as ``__main__`` too, whose module stays the caller's)."""
    import runpy

    from attn_search.export import python_module

    config = AttentionConfig(d_model=16, n_heads=2, pattern="window", window=5)
    task = make_task("mqar", seq_len=32, n_pairs=4)
    name = f"exported_{how.replace('-', '_')}"
    path = tmp_path / f"{name}.py"
    path.write_text(python_module(config, vocab_size=task.vocab_size, n_classes=task.n_classes, max_len=32))
    if how == "import":
        monkeypatch.syspath_prepend(str(tmp_path))
        namespace = vars(importlib.import_module(name))
    elif how.startswith("runpy"):
        namespace = runpy.run_path(str(path), run_name="__main__" if how == "runpy-as-main" else None)
    else:
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        namespace = vars(module)
    model = namespace["build_model"]()
    assert model(task.data("eval", 2)[0]).shape == (2, 32, task.n_classes)
    layer = namespace["SearchedAttention"](16, 2)
    assert layer(torch.randn(2, 32, 16)).shape == (2, 32, 16)
    # its CUDA path, FlexAttention under torch.compile (whose forward runs on a CPU too): dynamo reads
    # the mask_mod's globals by importing its module by name, which failed for the last two ways
    from torch.nn.attention.flex_attention import create_block_mask

    mask = pattern_mask("window", 32, causal=True, window=5)
    block_mask = create_block_mask(namespace["table_mask_mod"](mask), None, None, 32, 32, device="cpu")
    q, k, v = torch.randn(3, 1, 2, 32, 8).unbind(0)
    main = sys.modules["__main__"]
    out = layer.flex((q, k, v), block_mask, 8**-0.5, 0.0)
    assert torch.allclose(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), atol=1e-5)
    assert sys.modules["__main__"] is main  # (the caller's modules are left alone)
    names = set(sys.modules)
    layer.flex((q, k, v), block_mask, 8**-0.5, 0.0)
    assert set(sys.modules) == names  # (registered once, not at every call)


def test_report_rebuilds_from_the_study(tmp_path: Path) -> None:
    out, _ = search(tmp_path, trials=4)
    (out / "report.html").unlink()
    (out / "trials.csv").unlink()
    assert rebuild(out) == out / "report.html"
    html = (out / "report.html").read_text()
    assert "Pareto front" in html and "Chosen configuration" in html and "data:image/png;base64" in html
    assert len(pd.read_csv(out / "trials.csv")) == 4


def test_failed_trials_are_recorded_and_the_search_goes_on(tmp_path: Path) -> None:
    space = yaml.safe_load(Path(TINY).read_text())
    space["params"]["lr"] = {"type": "float", "low": 1.0e5, "high": 1.0e6, "log": True}  # diverges
    path = tmp_path / "diverge.yaml"
    path.write_text(yaml.safe_dump(space))
    out, summary = search(tmp_path, space=str(path), trials=3, pruner="none")
    trials = pd.read_csv(out / "trials.csv")
    assert summary.n_failed == 3  # type: ignore[attr-defined]
    assert trials["reason"].str.contains("non-finite training loss").all()
    assert not (out / "best_config.yaml").exists()


def test_resume_refuses_another_space_and_a_fresh_run_refuses_an_existing_dir(tmp_path: Path) -> None:
    out, _ = search(tmp_path, trials=2)
    with pytest.raises(UsageError, match="already holds a run"):
        search(tmp_path, trials=2)
    with pytest.raises(UsageError, match="different space"):
        search(tmp_path, trials=3, resume=True, compute="params")
    _, summary = search(tmp_path, trials=3, resume=True)
    assert summary.n_finished == 3  # type: ignore[attr-defined]
    assert math.isfinite(summary.hypervolume)  # type: ignore[attr-defined]


def test_a_slot_whose_refill_fails_to_start_retrains_its_members_alone_and_refills_an_invalid_job_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Commands that go wrong inside a slot never escape it: a refill whose admission raises (out of
    memory building it, say) is the population's error, so its members (the refill too) train
    again alone and complete; a refill whose values make no valid configuration fails alone and its
    seat is vacant again, so the loop can fill it."""
    from attn_search.backends import Finished, Job, SlotRun, Vacant
    from attn_search.engine import trainer

    space = load_space(TINY)
    budget = dataclasses.replace(PRESETS["smoke"], steps=6, rungs=2)
    runner = TrialRunner(space=space, budget=budget, task=space.task, task_kwargs=dict(space.task_params), seed=0)
    real_admit = trainer.Population._admit

    def admit(self: Any, k: int, member: int, config: AttentionConfig) -> None:
        if member == 3:
            raise RuntimeError("out of memory admitting trial 3")
        real_admit(self, k, member, config)

    good = {"n_heads": 2, "pattern": "dense", "lr": 3e-3}

    def drive(refills: list[Job]) -> tuple[list[int], dict[int, Any]]:
        slot = SlotRun(runner, [Job(0, good), Job(1, {**good, "lr": 4e-3})])
        vacated, outcomes = [], {}
        while not slot.done:
            for event in slot.advance():
                if isinstance(event, Finished):
                    outcomes[event.number] = event.outcome
                elif isinstance(event, Vacant):
                    vacated.append(event.index)
                    if refills:
                        slot.admit(event.index, refills.pop(0))
        return vacated, outcomes

    # 3 heads: invalid (d_model 16); the seat it was given is vacant again and takes the next job
    vacated, outcomes = drive([Job(2, {**good, "n_heads": 3}), Job(3, {**good, "lr": 5e-3}), Job(4, good)])
    assert outcomes[2].state == "failed" and "invalid configuration" in outcomes[2].reason
    assert vacated[:3] == [0, 1, 0] and outcomes[4].state == "complete"
    monkeypatch.setattr(trainer.Population, "_admit", admit)
    vacated, outcomes = drive([Job(3, {**good, "lr": 5e-3})])
    assert {n: o.state for n, o in outcomes.items()} == {0: "complete", 1: "complete", 3: "complete"}
    assert "out of memory admitting trial 3" in str(
        next(o.attrs["population_error"] for o in outcomes.values() if "population_error" in o.attrs)
    )


def test_a_trial_is_stopped_at_a_rung_but_never_after_its_last_step() -> None:
    space = load_space(TINY)
    budget = dataclasses.replace(PRESETS["smoke"], steps=6, rungs=2)
    runner = TrialRunner(space=space, budget=budget, task=space.task, task_kwargs=dict(space.task_params), seed=0)
    values = {"n_heads": 2, "pattern": "dense", "lr": 3e-3}
    seen: list[int] = []
    outcome = runner.run(values, on_rung=lambda step, acc, compute: seen.append(step) or True)
    assert seen == [3] and outcome.state == "pruned" and outcome.values is None
    seen.clear()  # a rule that says stop at the last rung: the trial has finished, its result is kept
    outcome = runner.run(values, on_rung=lambda step, acc, compute: seen.append(step) or step == 6)
    assert seen == [3, 6] and outcome.state == "complete" and outcome.values is not None


def test_a_trial_that_raises_is_recorded_failed_with_its_reason_and_the_search_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import attn_search.backends.base as search_module

    class Flaky(search_module.Training):  # type: ignore[misc,name-defined]
        def advance(self) -> Any:
            training = [c for _, c in self.waiting] + (self.population.configs if self.population else [])
            for config in training:  # a population with a window member raises: its companions go on
                if config.pattern == "window":
                    raise RuntimeError(f"window kernel exploded at w={config.window}")
            return super().advance()

    monkeypatch.setattr(search_module, "Training", Flaky)
    out, summary = search(tmp_path, trials=8, pruner="none", strategy="random", seed=1, population=4)
    trials = pd.read_csv(out / "trials.csv")
    assert len(trials) == 8 and summary.n_finished == 8  # type: ignore[attr-defined]
    failed = trials[trials["state"] == "failed"]
    assert len(failed) >= 1 and (trials["state"] == "complete").sum() >= 1, trials[["pattern", "state"]]
    assert (failed["pattern"] == "window").all()
    assert failed["reason"].str.fullmatch(r"RuntimeError: window kernel exploded at w=\d+").all()
    log = (out / "errors.log").read_text()
    fallbacks = log.count(" (population) at ")  # each population that raised says so, once
    assert fallbacks >= 1 and "members retrained alone: RuntimeError: window kernel exploded" in log
    assert log.count("=== trial") == len(failed) + fallbacks and "Traceback (most recent call last)" in log
    assert "window kernel exploded" in (out / "report.html").read_text()


def test_a_search_whose_first_trials_all_fail_the_same_way_stops(tmp_path: Path) -> None:
    from attn_search.errors import SearchAborted

    with pytest.raises(SearchAborted, match=r"first 3 trials all failed.*fragile task: cannot make") as info:
        search(tmp_path, trials=10, task="tests.custom_task:fragile", population=4)
    assert "errors.log" in str(info.value)
    trials = pd.read_csv(tmp_path / "run" / "trials.csv")
    assert list(trials["state"]) == ["failed"] * 4  # one population of 4: the policy stops after it


def test_failure_policy() -> None:
    from attn_search.search.failures import FailurePolicy

    def err(msg: str) -> dict[str, Any]:
        return {"error": "RuntimeError", "reason": f"RuntimeError: {msg}"}

    p = FailurePolicy(limit=3)
    assert p.observe("failed", err("out of memory: 12 MiB")) is None
    assert p.observe("failed", err("out of memory: 40 MiB")) is None  # numbers differ: the same error
    assert "out of memory" in (p.observe("failed", err("out of memory: 2 MiB")) or "")
    p = FailurePolicy(limit=3)
    for msg in ("a", "b", "a", "b"):  # different errors never make a streak
        assert p.observe("failed", err(msg)) is None
    p = FailurePolicy(limit=2)
    assert p.observe("failed", {"reason": "invalid configuration: x"}) is None  # refused before it ran: neutral
    assert p.observe("complete", {"metrics": {}}) is None
    assert p.observe("failed", err("a")) is None and p.observe("failed", err("a")) is None  # a trial got through
    p = FailurePolicy(limit=2)
    assert p.observe("failed", {"reason": "non-finite training loss", "metrics": {}}) is None  # trained: disarms
    assert p.observe("failed", err("a")) is None and p.observe("failed", err("a")) is None


@pytest.mark.parametrize("db", ["sqlite", "postgres"])
def test_resume_takes_over_only_trials_that_are_really_dead(tmp_path: Path, db: str, request: Any) -> None:
    """The heartbeat rule (a minute in a search; 2 s here), on SQLite and on a real PostgreSQL server."""
    import time

    import optuna

    from attn_search.search.loop import recover_interrupted

    url = f"sqlite:///{tmp_path / 's.db'}" if db == "sqlite" else request.getfixturevalue("postgres_url")
    storage = optuna.storages.RDBStorage(url, heartbeat_interval=1, grace_period=2)
    study = optuna.create_study(storage=storage, directions=["maximize"])
    ours, theirs_alive, theirs_dead = (study.ask() for _ in range(3))
    ours.set_user_attr("owner", "host:/runs/a")
    theirs_alive.set_user_attr("owner", "other:/runs/b")
    theirs_dead.set_user_attr("owner", "other:/runs/c")
    now = time.time()
    for t in (ours, theirs_alive, theirs_dead):
        storage.record_heartbeat(t._trial_id)
    time.sleep(3)  # every heartbeat is now stale ...
    storage.record_heartbeat(theirs_alive._trial_id)  # ... but this one's process is alive
    assert time.time() - now < 60
    assert recover_interrupted(study, owner="host:/runs/a") == 2
    states = {t.number: (t.state.name, t.user_attrs.get("interrupted")) for t in study.get_trials()}
    assert states[ours.number] == ("FAIL", True) and states[theirs_dead.number] == ("FAIL", True)
    assert states[theirs_alive.number] == ("RUNNING", None)
    assert len(study.get_trials(states=(optuna.trial.TrialState.WAITING,))) == 2  # re-enqueued


@pytest.mark.slow  # about 12 s: a ppo search with real training
def test_ppo_with_real_training_keeps_proposing_new_configurations(tmp_path: Path) -> None:
    """Training a trial must not reset the random state the agent samples its actions from (it
    used to: a 12-trial PPO search proposed 2 distinct configurations). Repeats are caught by the
    loop (not run again), so count the proposals themselves."""
    from attn_search.report.outputs import load_run

    out, summary = search(tmp_path, strategy="ppo", trials=12, steps=4, pruner="none")
    study = load_run(out)[0]
    repeats = [t for t in study.trials if "duplicate_of" in t.user_attrs]
    trials = pd.read_csv(out / "trials.csv")
    # the agent's first policy is near uniform over a grid of ~110 configurations (a few birthday
    # repeats); an agent whose random state is reset by every trial repeats itself at every step
    assert len(trials) == 12 and len(repeats) < 12, f"{len(repeats)} repeated proposals"
    assert len(trials[["n_heads", "pattern", "window", "lr"]].drop_duplicates()) >= 10


def test_a_custom_task_search_exports_that_tasks_model(tmp_path: Path) -> None:
    """The run dir names the task actually searched, and the Python export builds a model of that
    task's vocabulary, classes and length, into which the searched model's weights load."""
    out, _ = search(tmp_path, trials=3, task="tests.custom_task:make")
    exported = yaml.safe_load((out / "best_config.yaml").read_text())
    assert exported["task"] == "tests.custom_task:make"
    config = load_config(out / "best_config.yaml")
    assert set(exported["config"]) >= {"pattern", "n_heads"}
    unused = {"window", "dilation", "stride", "block_size", "n_global", "n_random"} - set(
        {"dense": [], "window": ["window"], "longformer": ["window", "n_global"]}[config.pattern]
    )
    assert not unused & set(exported["config"]), exported["config"]  # only what the pattern reads
    module = load_module(export_run(out, fmt="python", out=tmp_path / "custom.py"), "custom_export")
    task = make_task("tests.custom_task:make")
    assert (task.vocab_size, task.n_classes, task.seq_len) == (module.VOCAB_SIZE, module.N_CLASSES, module.MAX_LEN)
    assert_exported_matches(module, config, task, n=4)
    assert "tests.custom_task:make" in (out / "report.html").read_text()


def test_the_exported_layer_runs_on_the_block_sparse_path_on_cpu(tmp_path: Path, monkeypatch: Any) -> None:
    """A user's layer built from the export computes only the pattern's tiles (not dense attention
    with a mask), and gives dense masked attention's output, forward and gradients."""
    import torch.nn.functional as F

    from attn_search.export import python_module

    config = AttentionConfig(d_model=32, n_heads=2, pattern="window", window=8)
    path = tmp_path / "m_sparse.py"
    path.write_text(python_module(config, vocab_size=8, n_classes=4, max_len=512))
    module = load_module(path, "m_sparse")
    calls = []
    tiles = module.Tiles.__call__
    monkeypatch.setattr(module.Tiles, "__call__", lambda *a: calls.append(1) or tiles(*a))
    layer = module.SearchedAttention()
    x = torch.randn(2, 512, 32, requires_grad=True)
    y = layer(x)
    assert calls, "the exported window layer did not run the pattern's tiles"
    tiles_of = layer._plans[512, x.device][2][1]
    assert sum(len(qt) for qt, _, _ in tiles_of.groups) * tiles_of.tile == 512  # every query tile, once
    (gx,) = torch.autograd.grad(y.square().sum(), x)

    def dense_masked(x: torch.Tensor) -> torch.Tensor:  # the same layer, every score computed and masked
        q, k, v = (t.view(2, 512, 2, 16).transpose(1, 2) for t in layer.qkv(x).split(32, dim=-1))
        cos, sin = module.rotary(512, 16, x.device)
        mask = module.pattern_mask_of(module.pattern_rule, 512, x.device)
        q, k = module.rotate(q, cos, sin), module.rotate(k, cos, sin)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return layer.proj(out.transpose(1, 2).reshape(2, 512, 32))

    y_ref = dense_masked(x)
    (gx_ref,) = torch.autograd.grad(y_ref.square().sum(), x)
    assert torch.allclose(y, y_ref, atol=1e-5) and torch.allclose(gx, gx_ref, atol=1e-4)


def test_task_params_override_the_spaces_and_reach_the_trials(tmp_path: Path) -> None:
    """--task-param seq_len=48 trains at length 48: the run names it and the FLOPs are counted there."""
    import json

    from attn_search.engine.cost import model_flops

    out, _ = search(tmp_path, trials=1, steps=2, task_params={"seq_len": 48})
    run = json.loads((out / "run.json").read_text())
    assert run["task"] == "mqar" and run["task_params"] == {"seq_len": 48, "n_pairs": 4, "n_keys": 8, "n_values": 8}
    row = pd.read_csv(out / "trials.csv").iloc[0]
    report = html.unescape((out / "report.html").read_text())
    assert "this run searched the task below" in report and '"seq_len": 48' in report
    config = load_config(out / "best_config.yaml")
    task = make_task("mqar", **run["task_params"])
    assert row["flops"] == model_flops(config, seq_len=48, n_classes=task.n_classes)


def test_runs_share_one_storage_with_their_own_named_studies(tmp_path: Path) -> None:
    import optuna

    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    search(tmp_path / "a", trials=2, storage=storage)
    search(tmp_path / "b", trials=2, storage=storage)
    names = optuna.get_all_study_names(storage)
    assert len(names) == 2
    for name in names:
        study = optuna.load_study(study_name=name, storage=storage)
        assert study.metric_names == ["accuracy", "flops"] and len(study.trials) == 2


def test_a_population_slot_trains_its_members_together_and_stops_one_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--population 3: trials go out three to a slot; the early-stopping rule stops one member at
    its first rung, the others of its population train to the end, and the freed slot takes the
    next proposal at once (a refill), which trains its own 12 steps with its own rungs."""
    import attn_search.search.loop as search_module

    asked: list[tuple[int, int]] = []

    def stop_trial_1(self: Any, trial: Any, step: int, accuracy: float, compute: dict[str, float]) -> bool:
        asked.append((trial.number, step))
        return bool(trial.number == 1)

    monkeypatch.setattr(search_module._Rule, "stop", stop_trial_1)
    enqueue = [{"n_heads": 2, "pattern": p, "window": 4, "lr": 3e-3} for p in ("dense", "window", "longformer")]
    enqueue[0].pop("window")
    out, summary = search(tmp_path, trials=6, steps=12, population=3, strategy="random", enqueue=enqueue)
    trials = pd.read_csv(out / "trials.csv").set_index("trial")
    assert list(trials["slot"]) == [0] * 6  # one population: every later trial refilled a freed slot
    assert trials.loc[1, "state"] == "pruned" and trials.loc[1, "steps"] == 3  # rungs at steps 3, 6, 9, 12
    assert (trials.loc[[0, 2, 3, 4, 5], "state"] == "complete").all()
    assert (trials.loc[[0, 2, 3, 4, 5], "steps"] == 12).all()
    assert [s for n, s in asked if n == 1] == [3] and [s for n, s in asked if n == 0] == [3, 6, 9, 12]
    assert [s for n, s in asked if n == 3] == [3, 6, 9, 12]  # its own steps: it started when trial 1 stopped
    assert asked.index((3, 3)) < asked.index((0, 12))  # ... while trial 0 trained on
    # each member is scored as its own trial: the fused run gives what the member's own evaluate gives
    from attn_search import evaluate

    space = load_space(TINY)
    budget = dataclasses.replace(PRESETS["default"], steps=12)
    alone = evaluate(
        space.make_config(enqueue[0], seed=0), space.task, budget=budget, task_kwargs=dict(space.task_params)
    )
    assert abs(alone.metrics["accuracy"] - trials.loc[0, "accuracy"]) <= 0.03


def test_the_loop_decides_and_nothing_below_it_calls_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The event protocol: every rung decision and every proposal for a freed seat is made by the
    loop after the backend returned the event, never from inside the engine or a backend (no frame
    of theirs is on the stack when the early-stopping rule or the strategy is asked)."""
    import inspect

    import attn_search.search.loop as search_module
    from attn_search.strategies import samplers

    below = ("/attn_search/engine/", "/attn_search/backends/")
    stacks: dict[str, list[list[str]]] = {"ask": [], "rung": []}
    real_ask, real_stop = samplers.SamplerStrategy.ask, search_module._Rule.stop

    def where() -> list[str]:
        return [f"{f.filename}:{f.function}" for f in inspect.stack() if any(b in f.filename for b in below)]

    def ask(self: Any) -> Any:
        stacks["ask"].append(where())
        return real_ask(self)

    def stop(self: Any, *args: Any) -> bool:
        stacks["rung"].append(where())
        return bool(real_stop(self, *args))

    monkeypatch.setattr(samplers.SamplerStrategy, "ask", ask)
    monkeypatch.setattr(search_module._Rule, "stop", stop)
    out, summary = search(tmp_path, trials=8, steps=12, population=3, strategy="random")
    trials = pd.read_csv(out / "trials.csv")
    assert (trials["slot"] == 0).sum() > 3  # freed seats of the first population were refilled
    assert len(stacks["ask"]) >= 8 and len(stacks["rung"]) >= 8
    assert all(not frames for frames in stacks["ask"] + stacks["rung"]), stacks


def test_the_agent_acts_in_one_environment_per_population_member(tmp_path: Path) -> None:
    out, summary = search(tmp_path, trials=6, steps=6, population=3, strategy="ppo-grid")
    trials = pd.read_csv(out / "trials.csv")
    assert len(trials) == 6 and summary.n_finished == 6  # type: ignore[attr-defined]
    # its second round of proposals refills the first population's slots as they free
    assert sorted(trials["slot"].value_counts()) == [6]
    assert (out / "agent.zip").is_file()


def test_a_lookup_that_raises_fails_only_its_own_member(tmp_path: Path) -> None:
    """--population with an evaluator that raises for some configurations (the contract test's
    holed table): those members fail with their error, their slot-mates are looked up."""
    out, summary = search(tmp_path, space="sparse", evaluator="tests.contract_eval:make", trials=12, population=4,
                          strategy="random", seed=3)  # fmt: skip
    trials = pd.read_csv(out / "trials.csv")
    assert len(trials) == 12 and sorted(trials["slot"].value_counts()) == [4, 4, 4]
    failed = trials[trials["state"] == "failed"]
    assert len(failed) >= 1 and failed["reason"].str.startswith("KeyError").all(), trials[["state", "reason"]]
    holes = (trials["pattern"] != "dense") & (trials["lr"] == 0.006)  # what the holed table cannot look up
    assert (trials.loc[holes, "state"] == "failed").all() and (trials.loc[~holes, "state"] == "complete").all()


def test_the_default_pick_does_not_give_up_large_accuracy_for_small_compute() -> None:
    """The knee of a front whose compute spans 30% would take 0.665 over 0.912 and 1.000; ``knee``
    chooses among points within 95% of the best accuracy, ``knee=0`` is the plain knee."""
    from attn_search.report.outputs import describe_selection, parse_selection, select_row

    space = load_space("sparse").with_compute("flops")
    front = pd.DataFrame({"trial": [0, 1, 2, 3], "state": "complete", "feasible": True,
                          "accuracy": [0.35, 0.665, 0.912, 1.0], "flops": [2.67e7, 2.70e7, 3.08e7, 3.24e7]})  # fmt: skip
    assert int(select_row(front, space, "knee=0")["trial"]) == 1
    assert int(select_row(front, space, "knee")["trial"]) == 3
    assert int(select_row(front, space, "knee=0.6")["trial"]) == 2  # the knee of the three points above 0.6
    assert "95% of the best accuracy" in describe_selection("knee")
    with pytest.raises(ValueError, match="knee=F"):
        parse_selection("knee=1.5")


def test_report_select_and_a_later_export_agree(tmp_path: Path) -> None:
    out, _ = search(tmp_path, trials=5, pruner="none")
    rebuild(out, select="max-accuracy")
    chosen = yaml.safe_load((out / "best_config.yaml").read_text())
    exported = yaml.safe_load(export_run(out).read_text())  # no --select: the run's rule, now max-accuracy
    assert exported["trial"] == chosen["trial"] and exported["selected_by"] == "max-accuracy"
    export_run(out, select="min-compute", out=tmp_path / "cheap.yaml")  # a new rule becomes the run's too
    assert yaml.safe_load((out / "best_config.yaml").read_text())["selected_by"] == "min-compute"
    assert "min-compute" in (out / "report.html").read_text()


def test_a_trial_cut_short_by_the_time_budget_is_not_complete_and_the_end_says_why(tmp_path: Path) -> None:
    import io

    stream = io.StringIO()
    opts = SearchOptions(space=TINY, trials=50, steps=100_000, time_budget=3, pruner="none", out=str(tmp_path / "r"))
    summary = run_search(opts, stream=stream)
    trials = pd.read_csv(tmp_path / "r" / "trials.csv")
    cut = trials[trials["reason"].fillna("").str.startswith("cut short by the time budget at step")]
    assert len(cut) >= 1 and (cut["state"] == "pruned").all() and (cut["steps"] < 100_000).all()
    assert summary.front_size == 0  # type: ignore[attr-defined]  # nothing trained its budget
    assert "the time budget of 3 s ran out after" in stream.getvalue()


def test_importances_say_how_many_trials_are_behind_them_and_need_enough() -> None:
    import optuna

    from attn_search.report.outputs import MIN_TRIALS_FOR_IMPORTANCE, importance_rows

    study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(MIN_TRIALS_FOR_IMPORTANCE):
        t = study.ask()
        x, y = t.suggest_float("x", 0, 1), t.suggest_float("y", 0, 1)
        study.tell(t, [x + 0.01 * y, 1.0])
    assert "Not shown: 19 complete trial(s)" in importance_rows(study, MIN_TRIALS_FOR_IMPORTANCE - 1)
    table = importance_rows(study, MIN_TRIALS_FOR_IMPORTANCE)
    assert f"From {MIN_TRIALS_FOR_IMPORTANCE} complete trials" in table
    assert table.index("<td>x</td>") < table.index("<td>y</td>")  # x drives accuracy: ranked first


# -- compute at the deployment length (--target-len) --------------------------------------------
def test_target_length_flops_equal_model_flops_there_and_accuracy_is_unchanged() -> None:
    from attn_search import evaluate
    from attn_search.engine.cost import model_flops

    space = load_space(TINY)
    task = make_task(space.task, **space.task_params)
    # with dropout: measuring at the target length must not consume the trial's random draws
    config = space.make_config({"n_heads": 2, "pattern": "window", "window": 4, "lr": 3e-3}, seed=0).replace(
        dropout=0.1, attn_dropout=0.1
    )
    budget = dataclasses.replace(PRESETS["smoke"], steps=4)
    at_task = evaluate(config, task, budget=budget)
    at_target = evaluate(config, task, budget=dataclasses.replace(budget, target_len=1024))
    assert at_target.metrics["flops"] == model_flops(config, seq_len=1024, n_classes=task.n_classes)
    assert at_task.metrics["flops"] == model_flops(config, seq_len=task.seq_len, n_classes=task.n_classes)
    assert at_target.metrics["params"] == at_task.metrics["params"]
    assert at_target.metrics["accuracy"] == at_task.metrics["accuracy"]  # trained at the task's length alike
    assert at_target.curve == at_task.curve


def test_measured_latency_and_memory_grow_with_the_target_length() -> None:
    from attn_search.engine.trainer import measure_at_length

    space = load_space(TINY)
    task = make_task(space.task, **space.task_params)
    dense = space.make_config({"n_heads": 2, "pattern": "dense", "lr": 3e-3}, seed=0)
    short = measure_at_length(dense, task, 64, device=torch.device("cpu"), batch=1)
    long = measure_at_length(dense, task, 4096, device=torch.device("cpu"), batch=1)
    # 64x the length: the linear layers alone do 64x the work (attention 4096x); a busy machine
    # cannot close that gap
    assert long["latency_ms"] > 4 * short["latency_ms"], (short, long)
    assert long["flops"] > 64 * short["flops"] * 0.99


@pytest.mark.parametrize("population", [1, 2])
def test_a_search_reports_compute_at_the_target_length_and_resume_keeps_it(tmp_path: Path, population: int) -> None:
    import json

    from attn_search.engine.cost import model_flops

    out, _ = search(tmp_path, trials=2, steps=2, target_len=512, population=population, pruner="none")
    space = load_space(TINY)
    task = make_task(space.task, **space.task_params)
    trials = pd.read_csv(out / "trials.csv")

    def assert_flops_at_512(df: pd.DataFrame) -> None:
        for _, t in df.iterrows():
            values = {k: t[k] for k in ("n_heads", "pattern", "window", "lr") if not pd.isna(t[k])}
            assert t["flops"] == model_flops(space.make_config(values), seq_len=512, n_classes=task.n_classes)

    assert_flops_at_512(trials)
    record = json.loads((out / "run.json").read_text())
    low, high = record["hypervolume_bounds"]["flops"]
    assert low <= trials["flops"].min() and trials["flops"].max() <= high * (1 + 1e-9)  # ranges at 512 too
    assert "sequence length 512" in (out / "report.html").read_text()
    assert "compute at sequence length 512" in (out / "best_config.yaml").read_text()
    # --resume without the flag keeps measuring at 512 (the run's space includes its target length)
    run_search(SearchOptions(space=TINY, trials=3, steps=2, out=str(out), resume=True, quiet=True, pruner="none"))
    again = pd.read_csv(out / "trials.csv")
    assert len(again) == 3
    assert_flops_at_512(again)


@pytest.mark.parametrize("strategy", ["random", "ppo"])
def test_a_search_can_count_compute_as_the_tiles_flexattention_computes(tmp_path: Path, strategy: str) -> None:
    """``--compute attn_tile_flops``: the objective, each trial's figure and the console's compute line
    are the attention's FLOPs over 128-tiles at the target length (and ppo proposes by them)."""
    import optuna

    from attn_search.engine.cost import model_attention_flops, model_attention_tile_flops

    console = io.StringIO()
    out = tmp_path / "run"
    run_search(SearchOptions(space=TINY, strategy=strategy, trials=3, steps=2, target_len=1024, pruner="none",
                             compute="attn_tile_flops", out=str(out), attention_picture=False), stream=console)  # fmt: skip
    assert "compute: attn_tile_flops (the attention's analytic FLOPs over the 128-tiles FlexAttention computes) at " \
        "L=1024" in console.getvalue()  # fmt: skip
    study = optuna.load_study(study_name=None, storage=f"sqlite:///{out / 'study.db'}")
    assert study.metric_names == ["accuracy", "attn_tile_flops"]
    space = load_space(TINY)
    trials = pd.read_csv(out / "trials.csv")
    assert (trials["state"] == "complete").all()
    for _, t in trials.iterrows():
        config = space.make_config({k: t[k] for k in ("n_heads", "pattern", "window", "lr") if not pd.isna(t[k])})
        assert t["attn_tile_flops"] == model_attention_tile_flops(config, seq_len=1024)
        assert t["attn_flops"] == model_attention_flops(config, seq_len=1024) <= t["attn_tile_flops"]
    assert "attn_tile_flops" in (out / "report.html").read_text()
    if strategy == "ppo":  # the candidate policy's compute feature is the tiles' cost
        from attn_search.strategies import make_strategy
        from attn_search.strategies.base import StrategyContext

        searched = dataclasses.replace(space.with_compute("attn_tile_flops"), target_len=1024)
        context = StrategyContext(space=searched, seed=0, trials=3, slots=1, run_dir=tmp_path, resume=False,
                                  options={"head": "none"})  # fmt: skip
        policy = make_strategy("ppo", context)
        window = searched.make_config({"n_heads": 2, "pattern": "window", "window": 8, "lr": 0.003})
        tiles = model_attention_tile_flops(window, seq_len=1024)
        assert policy._cost(window) == tiles > model_attention_flops(window, seq_len=1024)  # type: ignore[attr-defined]


def test_a_search_training_on_cuda_with_entry_counted_compute_is_told_about_tiles() -> None:
    from attn_search.search.loop import tile_hint

    sparse = load_space("sparse")
    assert sparse.metrics[1] == "attn_tile_flops"  # its own: no hint
    assert tile_hint(sparse, "cuda", 256) is None
    entries = sparse.with_compute("attn_flops")
    assert "--compute attn_tile_flops" in str(tile_hint(entries, "cuda", 256))
    assert "--compute attn_tile_flops" in str(tile_hint(sparse.with_compute("flops"), "cuda", 256))
    assert tile_hint(entries, "cpu", 256) is None
    assert tile_hint(sparse.with_compute(None), "cuda", 256) is None  # accuracy alone
    assert tile_hint(load_space("dense"), "cuda", 256) is None  # no pattern to choose
    assert tile_hint(load_space("full"), "cuda", 256) is None  # flops there count width and depth too
    # tiles counted at one tile's length or less (a table of L=64 searched as recorded): flat, it says so
    at_64 = dataclasses.replace(sparse, target_len=None)
    assert "every pattern computes the same single 128-tile" in str(tile_hint(at_64, "cpu", 64))
    assert tile_hint(at_64, "cpu", 256) is None


def test_target_length_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="needs --evaluator training"):
        run_search(SearchOptions(space=TINY, target_len=512, evaluator="table:tables/sparse-smoke.csv",
                                 out=str(tmp_path / "a"), quiet=True))  # fmt: skip
    bad = tmp_path / "bad.yaml"
    bad.write_text(Path(TINY).read_text() + "target_len: -3\n")
    with pytest.raises(UsageError, match="target_len: -3 must be a positive integer"):
        run_search(SearchOptions(space=str(bad), out=str(tmp_path / "b"), quiet=True))
    good = tmp_path / "good.yaml"
    good.write_text(Path(TINY).read_text() + "target_len: 300\n")
    assert load_space(str(good)).target_len == 300


def test_a_trial_timed_on_a_busy_machine_is_flagged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from attn_search.engine import trainer

    real = trainer.measure_latency
    monkeypatch.setattr(trainer, "measure_latency", lambda fn, **kw: (real(fn, **kw)[0], 3.5))
    out, _ = search(tmp_path, trials=2, steps=2, quiet=False, pruner="none")
    said = capsys.readouterr().out
    assert len([line for line in said.splitlines() if "varied 3.5x" in line]) == 1  # once per search
    assert (pd.read_csv(out / "trials.csv")["latency_spread"] == 3.5).all()
    assert "Latency unreliable" in (out / "report.html").read_text()


BIGBIRD_ALL = {"n_heads": 2, "pattern": "bigbird", "block_size": 32, "n_global": 4, "n_random": 3, "dropout": 0.0,
               "attn_dropout": 0.0, "weight_decay": 0.01, "label_smoothing": 0.0, "lr": 0.005}  # fmt: skip
"""BigBird(32, 4, 3): at L=256 (8 blocks) its mask keeps every causal entry, as dense's does."""


class _Scripted:
    """A strategy that proposes ``script`` first, then what ``inner`` proposes, and records what
    it is told."""

    def __init__(self, inner: Any, space: Any, script: list[dict[str, Any]]) -> None:
        self.inner, self.space, self.script, self.name = inner, space, list(script), "scripted"
        self.told: list[tuple[dict[str, Any], Any]] = []

    def start(self, history: Any) -> str | None:
        return self.inner.start(history)

    def ask(self) -> dict[str, Any] | None:
        return self.script.pop(0) if self.script else self.inner.ask()

    def tell(self, values: dict[str, Any], outcome: Any) -> None:
        self.told.append((values, outcome))
        self.inner.tell(values, outcome)

    def close(self) -> None:
        self.inner.close()


@pytest.mark.slow  # (15-31 s: the default suite stays under 10 minutes on 2 cores)
def test_a_proposal_whose_mask_is_dense_s_is_one_trial_with_dense_and_is_named_dense(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """BigBird(32, 4, 3) proposed after dense at L=256 is not trained: it is dense there, so it is
    told dense's result. Run alone and chosen, the run dir, the report and the export name it dense."""
    import optuna

    from attn_search.search import loop as S

    made: list[_Scripted] = []
    original = S.make_strategy

    def scripted(name: str, context: Any, **kw: Any) -> Any:
        script = [{**BIGBIRD_ALL, "pattern": "dense"}, BIGBIRD_ALL] if not made else [BIGBIRD_ALL]
        made.append(_Scripted(original(name, context, **kw), context.space, script))
        return made[-1]

    monkeypatch.setattr(S, "make_strategy", scripted)
    out = tmp_path / "both"
    # (the sparse space counts compute at 4096 too, where the two differ: --target-len 256 counts it at the task's)
    run_search(SearchOptions(space="sparse", strategy="random", trials=2, steps=4, pruner="none", confirm=0,
                             target_len=256, out=str(out), quiet=True))  # fmt: skip
    trials = optuna.load_study(study_name=None, storage=f"sqlite:///{out / 'study.db'}").trials
    assert trials[0].params["pattern"] == "dense" and trials[1].params["pattern"] == "bigbird"
    assert trials[1].user_attrs["duplicate_of"] == 0  # one trial: BigBird was told dense's result
    values, outcome = made[0].told[1]
    assert values["pattern"] == "bigbird" and outcome.duplicate_of == 0
    assert (outcome.state, outcome.metrics) == ("complete", trials[0].user_attrs["metrics"])
    csv = pd.read_csv(out / "trials.csv")
    assert len(csv) == 2 and "bigbird" not in set(csv["pattern"])  # the second trial ran something else

    alone = tmp_path / "alone"
    run_search(SearchOptions(space="sparse", strategy="random", trials=1, steps=4, pruner="none", confirm=0,
                             target_len=256, out=str(alone), quiet=True))  # fmt: skip
    named = "dense: bigbird(b=32, g=4, r=3) h=2 keeps every entry at L=256"
    assert yaml.safe_load((alone / "best_config.yaml").read_text())["equivalent"] == named
    report = (alone / "report.html").read_text()
    assert html.escape(named) in report
    assert (
        "costs 100% of dense attention's FLOPs over 128-tiles at L=256" in report
        and "No configuration within" in report
    )
    exported = export_run(alone, fmt="python").read_text()
    assert (
        named in exported
        and "Caveat" not in exported
        and "caveat" not in yaml.safe_load((alone / "best_config.yaml").read_text())
    )

    # with compute counted at a longer length (1024 here, for speed; the space's own is 4096) it is
    # sparse where it is costed but trained as dense: the pick says its accuracy there is not measured
    deploy = tmp_path / "deploy"
    run_search(SearchOptions(space="sparse", strategy="random", trials=1, steps=4, pruner="none", confirm=0,
                             target_len=1024, out=str(deploy), quiet=True))  # fmt: skip
    share = pattern_entries("bigbird", 1024, causal=True, block_size=32, n_global=4, n_random=3) / pattern_entries(
        "dense", 1024, causal=True
    )
    assert 0.2 < share < 0.9
    caveat = yaml.safe_load((deploy / "best_config.yaml").read_text())["caveat"]
    assert caveat.startswith("Its accuracy was trained at L=256, where bigbird(b=32, g=4, r=3) h=2 keeps every entry")
    assert f"at L=1024, where compute is counted, it keeps {100 * share:.0f}% of dense's entries" in caveat
    assert "--seq-len 1024" in caveat
    assert "Caveat: its accuracy was trained at L=256" in (deploy / "report.html").read_text()
    assert "Caveat: Its accuracy was trained at L=256" in export_run(deploy, fmt="python").read_text()
    from attn_search.confirm import confirm_scale

    confirm_scale(deploy, seq_len=1024, steps=2, say=lambda _: None)  # measured there now: the caveat says what
    caveat = yaml.safe_load((deploy / "best_config.yaml").read_text())["caveat"]
    assert "retrained there (confirm --seq-len 1024) it reached accuracy" in caveat and "not measured" not in caveat


def test_the_report_shows_what_the_chosen_model_attends(tmp_path: Path) -> None:
    """After the search the chosen configuration is trained once more and its first layer's
    attention drawn: the probabilities are rows that sum to 1, zero outside its pattern; the
    picture is in the report while it is of the chosen trial, and a note replaces it otherwise."""
    from attn_search.engine.patterns import pattern_mask
    from attn_search.engine.single import attention_probs
    from attn_search.engine.trainer import train_model

    out, _ = search(tmp_path, trials=4, attention_picture=True)
    sidecar = json.loads((out / "attention.json").read_text())
    chosen = yaml.safe_load((out / "best_config.yaml").read_text())
    assert sidecar["trial"] == chosen["trial"] and (out / "attention.png").stat().st_size > 5000
    assert 'alt="attention.png"' in (out / "report.html").read_text()
    config = AttentionConfig(d_model=16, n_heads=2, pattern="window", window=4, batch_size=8)
    task = make_task("mqar", seq_len=32, n_pairs=4, n_keys=8, n_values=8)
    model, result = train_model(config, task, budget=Budget(steps=6, rungs=1, n_eval=16, latency_batch=2),
                                device="cpu")  # fmt: skip
    assert result.state == "complete" and result.metrics["steps"] == 6
    probs = attention_probs(model, task.data("eval", 1)[0][0])
    assert probs.shape == (2, 32, 32) and torch.allclose(probs.sum(-1), torch.ones(2, 32), atol=1e-5)
    assert (probs[:, ~pattern_mask("window", 32, causal=True, window=4)] == 0).all()
    sidecar["trial"] = -1  # a later selection picked another trial
    (out / "attention.json").write_text(json.dumps(sidecar))
    rebuild(out)
    page = (out / "report.html").read_text()
    assert 'alt="attention.png"' not in page and "of another trial" in page


def test_the_run_record_is_written_and_read_through_one_type(tmp_path: Path) -> None:
    """``run.json`` round-trips through :class:`RunRecord`; ``report --select`` makes its rule the
    run's; a run dir without a record, or with a broken one, is refused in one line."""
    from attn_search.search.rundir import RunRecord

    out, _ = search(tmp_path, trials=2)
    record = RunRecord.read(out)
    assert record.select == "knee" and record.study_name == json.loads((out / "run.json").read_text())["study_name"]
    assert record.budget_for().steps == 6 and record.budget_for().time_limit_s is None
    rebuild(out, select="max-accuracy")
    assert RunRecord.read(out).select == "max-accuracy"
    assert RunRecord.read(out).with_select("knee") == record
    (out / "run.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a readable run record"):
        RunRecord.read(out)
    with pytest.raises(ValueError, match=r"no run\.json"):
        RunRecord.read(tmp_path)


@pytest.mark.slow  # two real searches of the sparse space (14 s)
def test_the_sparse_space_counts_attention_tile_flops_and_a_resume_keeps_the_runs_compute(tmp_path: Path) -> None:
    """With no --compute the sparse space's own objective, the attention's FLOPs over the tiles a GPU
    kernel computes, is searched and counted at the target length; run.json records the choice, so a
    run started with --compute flops resumes with flops when the flag is not given again (and the
    space's fingerprint still matches)."""
    import optuna

    from attn_search.engine.cost import model_attention_flops, model_attention_tile_flops

    space = load_space("sparse")
    out = tmp_path / "attn"
    console = io.StringIO()
    run_search(SearchOptions(space="sparse", strategy="random", trials=2, steps=2, pruner="none", confirm=0,
                             target_len=1024, out=str(out), attention_picture=False), stream=console)  # fmt: skip
    assert ("compute: attn_tile_flops (the attention's analytic FLOPs over the 128-tiles FlexAttention computes) at "
            "L=1024, the target length; accuracy trains at the task's L=256") in console.getvalue()  # fmt: skip
    study = optuna.load_study(study_name=None, storage=f"sqlite:///{out / 'study.db'}")
    assert study.metric_names == ["accuracy", "attn_tile_flops"]
    assert json.loads((out / "run.json").read_text())["options"]["compute"] == "attn_tile_flops"
    trials = pd.read_csv(out / "trials.csv")
    for _, t in trials.iterrows():
        values = {p.name: t[p.name] for p in space.params if not pd.isna(t[p.name])}
        config = space.make_config(values)
        assert t["attn_flops"] == model_attention_flops(config, seq_len=1024) < t["flops"]
        assert t["attn_tile_flops"] == model_attention_tile_flops(config, seq_len=1024) >= t["attn_flops"]
    assert "of dense attention's FLOPs over 128-tiles at L=1024" in (out / "report.html").read_text()

    whole = tmp_path / "whole"
    options = dict(space="sparse", strategy="random", steps=2, pruner="none", confirm=0, target_len=1024,
                   out=str(whole), quiet=True, attention_picture=False)  # fmt: skip
    run_search(SearchOptions(**options, trials=1, compute="flops"))  # type: ignore[arg-type]
    run_search(SearchOptions(**options, trials=2, resume=True))  # type: ignore[arg-type]
    study = optuna.load_study(study_name=None, storage=f"sqlite:///{whole / 'study.db'}")
    assert study.metric_names == ["accuracy", "flops"] and len(study.trials) == 2


def test_the_spaces_own_compute_is_its_first_and_a_table_search_counts_at_its_tables_task(tmp_path: Path) -> None:
    """Without --compute a space's first compute objective is searched, whatever order its YAML
    lists them in (two objectives, so a resume rebuilds the same space); a table search names the
    task its table was recorded on (its header), so the console, the report's share of dense and
    the export count at that length; the candidate policy refuses a measured objective from any
    evaluator that is not a table."""
    from attn_search.search.plan import make_plan
    from attn_search.strategies import check_strategy

    spec = yaml.safe_load(Path(TINY).read_text())
    spec["objectives"] = {"attn_flops": "minimize", "accuracy": "maximize", "latency_ms": "minimize"}
    path = tmp_path / "three.yaml"
    path.write_text(yaml.safe_dump(spec))
    plan = make_plan(SearchOptions(space=str(path), out=str(tmp_path / "p"), quiet=True))
    assert plan.space.metrics == ["accuracy", "attn_flops"] and plan.compute == "attn_flops"

    table = Path(__file__).resolve().parents[1] / "tables" / "ngram-64.csv"
    out = tmp_path / "table"
    console = io.StringIO()
    run_search(SearchOptions(space="sparse", evaluator=f"table:{table}", strategy="random", trials=3, out=str(out)),
               stream=console)  # fmt: skip
    record = json.loads((out / "run.json").read_text())
    assert record["task"] == "ngram" and record["task_params"]["seq_len"] == 64
    assert "at the task's length L=64" in console.getvalue()
    # the space's own tiles are flat at L=64 (one tile): the search counts kept entries and says why
    assert "compute: attn_flops" in console.getvalue() and record["options"]["compute"] == "attn_flops"
    assert "but at the table's L=64 every configuration computes the same 128-tiles" in console.getvalue()
    assert "of dense attention's FLOPs at L=64" in (out / "report.html").read_text()
    asked = tmp_path / "tiles"
    console = io.StringIO()
    run_search(SearchOptions(space="sparse", evaluator=f"table:{table}", strategy="random", trials=2, out=str(asked),
                             compute="attn_tile_flops"), stream=console)  # fmt: skip
    assert "compute: attn_tile_flops" in console.getvalue()  # asked for: counted, and said to be flat
    assert "(at L=64 every pattern computes the same single 128-tile" in console.getvalue()

    latency = load_space("sparse").with_compute("latency")
    with pytest.raises(ValueError, match="needs --compute flops, attn_flops or attn_tile_flops"):
        check_strategy("ppo", latency, evaluator="my_module:evaluator", constrained=False, options={})
    check_strategy("ppo", load_space("sparse"), evaluator="my_module:evaluator", constrained=False, options={})
