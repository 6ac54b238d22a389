"""Confirmation of a run's front: more seeds (``--confirm``, ``attn-search confirm``) and the scale check."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from attn_search.confirm import confirm_scale, confirm_seeds, extra_seeds, kendall_tau
from attn_search.report.outputs import CONFIRM_FILE, mark_noise, select_row, with_confirmations
from attn_search.search.loop import SearchOptions, UsageError, run_search
from attn_search.search.space import load_space

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "tests" / "data" / "tiny.yaml")


def tiny_run(tmp_path: Path, **kw: object) -> Path:
    out = tmp_path / "run"
    opts = {"space": TINY, "trials": 5, "steps": 8, "out": str(out), "quiet": True, "pruner": "none", **kw}
    run_search(SearchOptions(**opts))  # type: ignore[arg-type]
    return out


def test_confirm_retrains_each_front_point_with_new_seeds_and_records_them_all(tmp_path: Path) -> None:
    out = tiny_run(tmp_path, confirm=2)
    extra = pd.read_csv(out / CONFIRM_FILE)
    trials = pd.read_csv(out / "trials.csv")
    front = pd.read_csv(out / "pareto.csv")
    # every front point has both extra seeds, none of them the search's own seed
    for _, row in front.iterrows():
        mine = extra[extra["trial"] == row["trial"]]
        assert sorted(mine["seed"]) == extra_seeds(int(row["seed"]), 2) and int(row["seed"]) not in set(mine["seed"])
        # its accuracy is the mean over the search's run and the confirmations, with the spread beside it
        values = [row["accuracy_search"], *mine["accuracy"]]
        assert row["accuracy"] == pytest.approx(np.mean(values)) and row["seeds"] == 3
        assert row["accuracy_sd"] == pytest.approx(np.std(values, ddof=1))
    assert len(extra) == 2 * len(extra["trial"].unique()) and set(front["trial"]) <= set(extra["trial"])
    assert {"accuracy_search", "accuracy_sd", "seeds"} <= set(trials.columns)
    best = yaml.safe_load((out / "best_config.yaml").read_text())
    assert best["metrics"]["seeds"] == 3 and "accuracy_sd" in best["metrics"]
    assert "mean over 3 seeds" in (out / "report.html").read_text()
    # seeds change the training: at least one retrain differs from the search's run
    merged = extra.merge(trials[["trial", "accuracy_search"]], on="trial")
    assert (merged["accuracy"] != merged["accuracy_search"]).any()


def test_selection_and_front_use_the_mean(tmp_path: Path) -> None:
    space = load_space(TINY)
    base = {"state": "complete", "feasible": True, "seed": 0, "pattern": "dense", "n_heads": 2}
    df = pd.DataFrame([
        {**base, "trial": 0, "accuracy": 0.90, "flops": 1.0},  # lucky seed: its mean is 0.60
        {**base, "trial": 1, "accuracy": 0.85, "flops": 2.0},
        {**base, "trial": 2, "accuracy": 0.50, "flops": 3.0},  # dominated
    ])  # fmt: skip
    assert int(select_row(df, space, "max-accuracy")["trial"]) == 0  # type: ignore[index]
    pd.DataFrame([
        {"trial": 0, "seed": 1, "state": "complete", "accuracy": 0.45, "steps": 8, "seconds": 1},
        {"trial": 0, "seed": 2, "state": "complete", "accuracy": 0.45, "steps": 8, "seconds": 1},
        {"trial": 1, "seed": 1, "state": "complete", "accuracy": 0.83, "steps": 8, "seconds": 1},
        {"trial": 1, "seed": 2, "state": "failed", "accuracy": math.nan, "steps": 3, "seconds": 1},
    ]).to_csv(tmp_path / CONFIRM_FILE, index=False)  # fmt: skip
    merged = with_confirmations(df, tmp_path)
    assert merged.loc[0, "accuracy"] == pytest.approx(0.6) and merged.loc[0, "seeds"] == 3
    # the failed retrain is left out
    assert merged.loc[1, "accuracy"] == pytest.approx(0.84) and merged.loc[1, "seeds"] == 2
    assert merged.loc[2, "seeds"] == 1 and math.isnan(merged.loc[2, "accuracy_sd"])
    assert int(select_row(merged, space, "max-accuracy")["trial"]) == 1  # type: ignore[index]
    marked = mark_noise(merged.sort_values("accuracy", ascending=False))
    # 0.84 vs 0.60: a gap of 0.24 against a spread of 0.26 (trial 0's): within noise
    assert list(marked["within_noise_of"])[:2] == ["trial 0", ""]


def test_kendall_tau_on_a_small_case() -> None:
    assert kendall_tau([0.1, 0.2, 0.3], [0.1, 0.2, 0.3]) == pytest.approx(1.0)
    assert kendall_tau([0.1, 0.2, 0.3], [0.3, 0.2, 0.1]) == pytest.approx(-1.0)
    # pairs (1,2) concordant, (1,3) concordant, (2,3) discordant: (2 - 1) / 3
    assert kendall_tau([0.1, 0.2, 0.3], [0.1, 0.3, 0.2]) == pytest.approx(1 / 3)
    assert math.isnan(kendall_tau([0.5], [0.7]))


def test_scale_check_trains_the_front_at_the_larger_length_and_reports_tau(tmp_path: Path) -> None:
    out = tiny_run(tmp_path, confirm=0)
    said: list[str] = []
    result = confirm_scale(out, seq_len=64, steps=6, top=3, say=said.append)
    rows = pd.read_csv(out / "scale.csv")
    front = pd.read_csv(out / "pareto.csv")
    assert set(rows["trial"]) == set(front["trial"].head(3)) and (rows["seq_len"] == 64).all()
    assert (rows["steps"] == 6).all()
    points = result["points"]
    assert result["kendall_tau"] == pytest.approx(kendall_tau([p["accuracy_proxy"] for p in points],
                                                              [p["accuracy_scale"] for p in points]), nan_ok=True)  # fmt: skip
    assert json.loads((out / "scale.json").read_text())["seq_len"] == 64
    assert "Scale check" in (out / "report.html").read_text()
    assert any("Kendall" in line for line in said)
    again = confirm_scale(out, seq_len=64, steps=6, top=3, say=said.append)  # nothing trained twice
    assert len(pd.read_csv(out / "scale.csv")) == len(rows) and again["points"] == points
    with pytest.raises(ValueError, match="--seq-len 0 is invalid"):
        confirm_scale(out, seq_len=0)


@pytest.mark.slow  # about 11 s: a search, a killed confirmation and its resume
def test_a_killed_confirmation_resumes_and_loses_nothing(tmp_path: Path) -> None:
    out = tiny_run(tmp_path, confirm=0, steps=120)
    proc = subprocess.Popen([sys.executable, "-m", "attn_search.cli", "confirm", str(out), "--seeds", "3"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    path = out / CONFIRM_FILE
    deadline = time.time() + 120
    while time.time() < deadline and (not path.exists() or len(pd.read_csv(path)) < 1):
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = pd.read_csv(path)
    front_size = len(pd.read_csv(out / "pareto.csv"))
    assert 1 <= len(before) < 3 * front_size, "the kill must land mid-confirmation"
    confirm_seeds(out, seeds=3, say=lambda _: None)
    after = pd.read_csv(path)
    assert not after.duplicated(["trial", "seed"]).any()
    kept = before.merge(after, on=["trial", "seed", "accuracy"])
    assert len(kept) == len(before)  # what finished before the kill is kept as it was, not trained again
    front = pd.read_csv(out / "pareto.csv")
    for _, row in front.iterrows():
        assert row["seeds"] == 4


def test_confirm_errors(tmp_path: Path) -> None:
    from attn_search.cli import main

    with pytest.raises(UsageError, match="needs --evaluator training"):
        run_search(SearchOptions(space="sparse", confirm=2, evaluator="table:tables/sparse-smoke.csv",
                                 out=str(tmp_path / "a"), quiet=True))  # fmt: skip
    assert main(["confirm", str(tmp_path / "nowhere")]) == 2
    assert main(["confirm", str(tmp_path), "--top", "3"]) == 2  # --top without --seq-len


def test_seeds_retrained_together_as_on_cuda_match_one_by_one() -> None:
    """On CUDA a point's seeds train as one population; the same path on the CPU gives each seed
    what training it alone gives (the failure class: seeds mixed up or trained as one)."""
    import dataclasses

    from attn_search.confirm import retrain
    from attn_search.engine.trainer import PRESETS

    space = load_space(TINY)
    base = space.make_config({"n_heads": 2, "pattern": "window", "window": 4, "lr": 3e-3})
    configs = [base.replace(seed=s) for s in extra_seeds(0, 3)]
    budget = dataclasses.replace(PRESETS["smoke"], steps=6)
    kwargs = dict(space.task_params)
    together = retrain(configs, space.task, budget, "cpu", kwargs, together=True)
    alone = retrain(configs, space.task, budget, "cpu", kwargs, together=False)
    assert [r.config.seed for r in together] == [1, 2, 3]
    for a, b in zip(together, alone, strict=True):
        assert a.metrics["accuracy"] == pytest.approx(b.metrics["accuracy"], abs=0.03)
    assert len({r.metrics["final_loss"] for r in together}) == 3  # three different seeds, not one run thrice
