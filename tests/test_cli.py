"""The command line as users run it: real subprocesses."""

from __future__ import annotations

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
        (["--task-param", "seq_len"], "argument --task-param: 'seq_len' is not KEY=VALUE"),
        (["--task-param", "lenght=128"], "task 'mqar' has no parameter lenght"),
        (["--task", "listops", "--task-param", "n_pairs=8"], "task 'listops' has no parameter n_pairs"),
        *([] if torch.cuda.is_available() else [(["--space", TINY, "--device", "cuda"], "no CUDA GPU is visible")]),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    args: list[str], expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """In process (the CLI's own entry point); one case below runs as a real process."""
    from attn_search.cli import search_main

    try:
        status = search_main([*args, "--out", str(tmp_path / "out")])
    except SystemExit as exc:  # argparse's own errors
        status = int(exc.code or 0)
    err = capsys.readouterr().err
    assert status == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], err
    assert not (tmp_path / "out").exists()  # nothing left behind: the corrected rerun works as typed


def test_bad_input_as_a_real_process(tmp_path: Path) -> None:
    r = run("--space", TINY, "--task", "tests.custom_task:wrong_shape", "--out", str(tmp_path / "out"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "must be (n, seq_len)" in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


def test_out_naming_a_file_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "afile"
    target.write_text("keep me")
    r = run("--space", TINY, "--out", str(target))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "is a file" in r.stderr
    assert target.read_text() == "keep me"


def test_a_search_whose_first_trials_all_fail_exits_1_with_the_error_as_last_line(tmp_path: Path) -> None:
    out = tmp_path / "run"
    r = run(
        "--space",
        TINY,
        "--trials",
        "20",
        "--steps",
        "4",
        "--task",
        "tests.custom_task:fragile",
        "--out",
        str(out),
        "--population",
        "1",
    )
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "first 3 trials all failed" in lines[0], r.stderr  # no traceback
    assert "RuntimeError: fragile task: cannot make 32 examples" in lines[0]
    assert (out / "errors.log").read_text().count("Traceback (most recent call last)") == 3
    assert list(pd.read_csv(out / "trials.csv")["state"]) == ["failed"] * 3


@pytest.mark.slow  # (15-31 s: the default suite stays under 10 minutes on 2 cores)
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


def test_search_then_export_and_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from attn_search.cli import main

    out = tmp_path / "run"
    r = run("--space", TINY, "--trials", "3", "--steps", "4", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "framework overhead" in r.stdout and "[  3/3]" in r.stdout
    capsys.readouterr()
    # the other commands through `attn-search`'s entry point, in process
    assert main(["export", str(out), "--format", "python"]) == 0
    assert Path(capsys.readouterr().out.strip()).is_file()
    assert main(["report", str(out)]) == 0
    assert Path(capsys.readouterr().out.strip()).name == "report.html"
    assert main(["export", str(tmp_path)]) == 2
    assert "not an attn_search run dir" in capsys.readouterr().err


def test_a_task_module_in_the_current_directory_is_found_by_the_console_script(tmp_path: Path) -> None:
    """`attn-search search --task mytask:make` from the folder holding mytask.py, as a user runs it
    (a console script's sys.path does not hold the current directory by itself)."""
    (tmp_path / "mytask.py").write_text((ROOT / "tests" / "custom_task.py").read_text())
    script = Path(sys.executable).parent / "attn-search"
    r = subprocess.run([str(script), "search", "--space", TINY, "--task", "mytask:make", "--trials", "1", "--steps",
                        "2", "--out", "run", "--quiet"], capture_output=True, text=True, timeout=120, cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert pd.read_csv(tmp_path / "run" / "trials.csv")["state"].tolist() == ["complete"]
