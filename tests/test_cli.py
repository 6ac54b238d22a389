"""The command line as users run it: real subprocesses."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

ROOT = Path(__file__).parent.parent
TINY = str(Path(__file__).parent / "data" / "tiny.yaml")


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "run_search.py"), *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


@pytest.mark.parametrize(
    "args,expected",
    [
        (["--space", "sparsest"], "neither a built-in space"),
        (["--strategy", "annealing"], "argument --strategy: invalid choice: 'annealing'"),
        (["--compute", "watts"], "argument --compute: invalid choice: 'watts'"),
        (["--trials", "-3"], "argument --trials: -3 is invalid: it must be at least 1"),
        (["--space", TINY.replace("tiny", "missing")], "no such file"),
        (["--select", "best"], "--select 'best' is unknown"),
        (["--backend", "slurm"], "argument --backend: invalid choice: 'slurm'"),
        (["--max-concurrent", "2"], "--max-concurrent: only with --backend ray"),
        (["--gpus-per-trial", "-1"], "argument --gpus-per-trial: -1.0 is invalid: it must be >= 0"),
        (["--strategy", "cmaes"], "single objective"),
        # found before the run dir exists, not inside the first trial
        (["--space", TINY, "--task", "tests.custom_task:float_tokens"], "token ids and targets must be integers"),
        (["--space", TINY, "--task", "tests.custom_task:wrong_shape"], "x has shape (4, 31): it must be (n, seq_len)"),
        (["--space", TINY, "--task", "tests.custom_task:targets_out_of_range"], "they must lie in [0, n_classes=2)"),
        (["--space", TINY, "--task", "tests.custom_task:not_a_task"], "lacks the Task protocol"),
        (["--space", TINY, "--storage", "notaurl"], "--storage 'notaurl': ArgumentError"),
        *([] if torch.cuda.is_available() else [(["--space", TINY, "--device", "cuda"], "no CUDA GPU is visible")]),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args: list[str], expected: str, tmp_path: Path) -> None:
    r = run(*args, "--out", str(tmp_path / "out"))
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], r.stderr
    assert not (tmp_path / "out").exists()  # nothing left behind: the corrected rerun works as typed


def test_out_naming_a_file_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "afile"
    target.write_text("keep me")
    r = run("--space", TINY, "--out", str(target))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "is a file" in r.stderr
    assert target.read_text() == "keep me"


def test_a_search_whose_first_trials_all_fail_exits_1_with_the_error_as_last_line(tmp_path: Path) -> None:
    out = tmp_path / "run"
    r = run("--space", TINY, "--trials", "20", "--steps", "4", "--task", "tests.custom_task:fragile", "--out", str(out))
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "first 3 trials all failed" in lines[0], r.stderr  # no traceback
    assert "RuntimeError: fragile task: cannot make 32 examples" in lines[0]
    assert (out / "errors.log").read_text().count("Traceback (most recent call last)") == 3
    assert list(pd.read_csv(out / "trials.csv")["state"]) == ["failed"] * 3


def test_one_search_per_run_dir(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = [sys.executable, str(ROOT / "run_search.py"), "--space", TINY, "--trials", "50", "--steps", "200",
            "--out", str(out), "--quiet"]  # fmt: skip
    first = subprocess.Popen(args, cwd=ROOT)
    try:
        deadline = time.time() + 60
        while not (out / "run.json").exists() and time.time() < deadline:
            time.sleep(0.05)
        second = run("--space", TINY, "--trials", "50", "--steps", "200", "--out", str(out), "--resume")
        assert second.returncode == 2, second.stderr
        assert second.stderr.count("\n") == 1 and "is in use by another search" in second.stderr
        assert first.poll() is None  # the first search was left alone
    finally:
        first.kill()
        first.wait()
    resumed = run("--space", TINY, "--trials", "2", "--steps", "4", "--out", str(out), "--resume")  # lock released
    assert resumed.returncode == 0, resumed.stderr


def test_malformed_yaml_is_one_line_and_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("params:\n  lr: {type: float, low: 1, high: 0}\n")
    r = run("--space", str(bad), "--out", str(tmp_path / "out"))
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "bad.yaml: params.lr: low=1 must be below high=0" in r.stderr


def test_search_then_export_and_report(tmp_path: Path) -> None:
    out = tmp_path / "run"
    r = run("--space", TINY, "--trials", "3", "--steps", "4", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "framework overhead" in r.stdout and "[  3/3]" in r.stdout
    cli = [sys.executable, "-m", "attn_search.cli"]
    e = subprocess.run([*cli, "export", str(out), "--format", "python"], capture_output=True, text=True, cwd=ROOT)
    assert e.returncode == 0 and Path(e.stdout.strip()).is_file()
    rep = subprocess.run([*cli, "report", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert rep.returncode == 0 and Path(rep.stdout.strip()).name == "report.html"
    bad = subprocess.run([*cli, "export", str(tmp_path)], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "not an attn_search run dir" in bad.stderr


def test_kill_9_mid_trial_then_resume_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = [sys.executable, str(ROOT / "run_search.py"), "--space", TINY, "--trials", "6", "--steps", "60",
            "--pruner", "none", "--out", str(out)]  # fmt: skip
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until two trials finished, then kill during the next one
        csv = out / "trials.csv"
        if csv.exists() and (pd.read_csv(csv)["state"] == "complete").sum() >= 2:
            break
        time.sleep(0.05)
    time.sleep(0.3)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = pd.read_csv(out / "trials.csv")
    finished_before = before[before["state"] == "complete"]
    assert len(finished_before) >= 2
    r = run("--space", TINY, "--trials", "6", "--steps", "60", "--pruner", "none", "--out", str(out), "--resume")
    assert r.returncode == 0, r.stderr
    after = pd.read_csv(out / "trials.csv")
    counted = after[after["state"] != "interrupted"]
    assert (counted["state"] == "complete").sum() == 6, after[["trial", "state"]]
    # every trial finished before the kill is still there, unchanged
    merged = finished_before.merge(after, on="trial", suffixes=("_b", "_a"))
    assert len(merged) == len(finished_before)
    assert (merged["accuracy_b"] == merged["accuracy_a"]).all()
    # the interrupted trial's configuration ran again exactly once
    interrupted = after[after["state"] == "interrupted"]
    assert len(interrupted) <= 1
    if len(interrupted):
        lr = interrupted["lr"].iloc[0]
        assert (counted["lr"] == lr).sum() == 1
