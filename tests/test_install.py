"""A regular (non-editable) install works from any working directory, the clone's root included.

The package maps the top-level ``envs/`` and ``search_spaces/`` folders into ``attn_search`` at
install time. Run from the clone's root, Python imports the clone's ``attn_search/`` folder
instead of the installed package (``run_search.py``'s folder comes first on ``sys.path``; Ray
workers started there do the same), and that folder must work too.

A fresh venv without pip borrows the dependencies of the test environment through a path file
(which does not process that environment's own path files, so its editable install of this
project stays out), and gets this project from ``pip install --no-deps .``.
"""

from __future__ import annotations

import site
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parent.parent
TABLE = str(ROOT / "tables" / "sparse-smoke.csv")


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    env = tmp_path_factory.mktemp("venv") / "v"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
    py = env / "bin" / "python"
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    (Path(purelib) / "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    build = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", "--no-build-isolation",
         str(ROOT)], capture_output=True, text=True, timeout=300, cwd=tmp_path_factory.mktemp("build"),
    )  # fmt: skip
    assert build.returncode == 0, build.stderr[-2000:]
    return env


def _search(venv: Path, cwd: Path, out: Path, *cmd: str) -> subprocess.CompletedProcess[str]:
    args = [*cmd, "--space", "sparse", "--evaluator", f"table:{TABLE}", "--trials", "3", "--out", str(out), "--quiet"]
    return subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=cwd)


def test_installed_package_runs_a_search_from_another_directory(venv: Path, tmp_path: Path) -> None:
    py = str(venv / "bin" / "python")
    where = subprocess.run([py, "-c", "import attn_search, attn_search.envs; print(attn_search.__file__)"],
                           capture_output=True, text=True, cwd=tmp_path)  # fmt: skip
    assert where.returncode == 0, where.stderr
    assert str(venv) in where.stdout, f"the installed package was not the one imported: {where.stdout}"
    r = _search(venv, tmp_path, tmp_path / "run", str(venv / "bin" / "attn-search"), "search")
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(pd.read_csv(tmp_path / "run" / "trials.csv")) == 3


def test_run_search_from_the_clone_root_with_a_regular_install(venv: Path, tmp_path: Path) -> None:
    """From the clone's root the clone's own ``attn_search/`` is imported: it must find ``envs``
    and ``search_spaces`` as the installed package does."""
    py = str(venv / "bin" / "python")
    r = _search(venv, ROOT, tmp_path / "run", py, "run_search.py")
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(pd.read_csv(tmp_path / "run" / "trials.csv")) == 3
    probe = (
        "import attn_search.envs.attention_search as m, attn_search.search_spaces as s; print(m.__file__, s.__file__)"
    )
    where = subprocess.run([py, "-c", probe], capture_output=True, text=True, cwd=ROOT)
    assert where.returncode == 0, where.stderr
    assert str(ROOT / "envs") in where.stdout and str(ROOT / "search_spaces") in where.stdout, where.stdout


@pytest.mark.slow  # about 12 s: installs the package and runs the agent
def test_the_installed_package_ships_the_meta_trained_agent(venv: Path, tmp_path: Path) -> None:
    """``--strategy ppo`` in a regular install, from another directory, loads the shipped candidate
    policy (package data, provenance intact) and says so."""
    r = subprocess.run([str(venv / "bin" / "attn-search"), "search", "--space", "sparse", "--strategy", "ppo",
                        "--preset", "smoke", "--trials", "2", "--steps", "2", "--target-len", "256",
                        "--out", str(tmp_path / "run")],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    line = next(x for x in r.stdout.splitlines() if "ppo:" in x and "candidate policy" in x)
    import json

    from attn_search.strategies.candidates import SHIPPED

    families = json.loads(SHIPPED.with_suffix(".json").read_text())["families"]
    assert len(families) >= 8 and f"candidate-ppo.zip, meta-trained on {', '.join(families)}" in line


_BLOCKED = ("gymnasium", "stable_baselines3", "optuna", "ray", "pandas", "yaml", "matplotlib", "plotly")


def test_the_engine_imports_and_trains_with_torch_alone() -> None:
    # A CUDA image with torch (and numpy) and nothing else: every other package is blocked, so an
    # import of one anywhere on the path from `import attn_search` to evaluate_many fails here.
    code = (
        "import sys\n"
        f"for m in {_BLOCKED!r}: sys.modules[m] = None\n"
        "import attn_search\n"
        "from attn_search import AttentionConfig, evaluate, evaluate_many\n"
        "cfgs = [AttentionConfig(pattern='window', window=8, attn_dropout=0.05),"
        " AttentionConfig(pattern='dense', n_heads=4)]\n"
        "rs = evaluate_many(cfgs, 'mqar', budget=3, task_kwargs={'seq_len': 32, 'n_pairs': 4}, device='cpu')\n"
        "r = evaluate(cfgs[0], 'ngram', budget=2, task_kwargs={'seq_len': 16}, device='cpu')\n"
        "assert [x.state for x in rs + [r]] == ['complete'] * 3\n"
        "print(sorted(m for m in " + repr(_BLOCKED) + " if sys.modules.get(m) is not None))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


def test_importing_gymnasium_first_registers_the_env() -> None:
    code = "import gymnasium, attn_search\nprint('attn_search/AttentionSearch-v0' in gymnasium.registry)\n"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "True"
