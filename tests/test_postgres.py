"""Searches against a real PostgreSQL server (``--storage postgresql://...``), as teams share one.

The server is Debian's ``postgresql`` on loopback (``tests/pgserver.py``; ``.ci/run`` installs and
starts it). Every search here is a real process running the real CLI.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import optuna
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "tests" / "data" / "tiny.yaml")
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


def _search(out: Path, url: str, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "run_search.py"), "--space", TINY, "--out", str(out), "--storage", url,
            "--quiet", *extra]  # fmt: skip


def _counted(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Trials that ran to an end (not the interrupted ones, nor duplicate proposals that never ran)."""
    return [t for t in study.get_trials() if t.state in FINISHED or (
        t.state == optuna.trial.TrialState.FAIL and not t.user_attrs.get("interrupted")
        and "duplicate_of" not in t.user_attrs)]  # fmt: skip


def _study_of(out: Path, url: str) -> optuna.Study:
    import json

    name = json.loads((out / "run.json").read_text())["study_name"]
    return optuna.load_study(study_name=name, storage=url)


@pytest.mark.slow  # about 15 s: three searches; .ci/run runs the slow tests too
def test_three_searches_at_once_share_one_postgres_storage(tmp_path: Path, postgres_url: str) -> None:
    outs = [tmp_path / f"run{i}" for i in range(3)]
    procs = [subprocess.Popen(_search(o, postgres_url, "--trials", "4", "--steps", "6", "--confirm", "0", "--seed", str(i)),
                              cwd=ROOT, stderr=subprocess.PIPE, text=True) for i, o in enumerate(outs)]  # fmt: skip
    for p in procs:
        _, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-2000:]
    names = optuna.get_all_study_names(postgres_url)
    assert len(names) == 3
    for out in outs:
        study = _study_of(out, postgres_url)
        done = _counted(study)
        assert len(done) == 4, [(t.number, t.state.name) for t in study.get_trials()]
        assert len({t.number for t in done}) == 4
        csv = pd.read_csv(out / "trials.csv")
        # each finished trial of the storage is in its run's table exactly once, and nothing else is
        assert sorted(csv["trial"]) == sorted(t.number for t in done)
        stored = {t.number: t.values[0] for t in done if t.state == optuna.trial.TrialState.COMPLETE}
        for _, row in csv[csv["state"] == "complete"].iterrows():
            assert row["accuracy"] == pytest.approx(stored[int(row["trial"])])


@pytest.mark.slow  # about 30 s on 2 cores: keeps `make test` under 10 minutes
def test_a_search_killed_with_sigkill_resumes_against_postgres_losing_and_duplicating_nothing(
    tmp_path: Path, postgres_url: str
) -> None:
    out = tmp_path / "run"
    first = subprocess.Popen(_search(out, postgres_url, "--trials", "8", "--steps", "900", "--pruner", "none", "--confirm", "0"),
                             cwd=ROOT, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.time() + 240
        before: list[optuna.trial.FrozenTrial] = []
        while time.time() < deadline and first.poll() is None:
            time.sleep(0.05)
            if (out / "run.json").exists():
                seen = _study_of(out, postgres_url)
                before = _counted(seen)
                # kill mid-trial: after two finished, once the next one has just started. A trial takes
                # about 1.5 s here, so one seen running under 0.4 s after its start is still running when
                # the kill lands (CI once saw a trial of 0.4 s end between the check and the kill). A
                # repeat of a finished configuration is answered from its result at once, so it is not
                # one.
                done = [t.params for t in before]
                fresh = [t for t in seen.get_trials() if t.state == optuna.trial.TrialState.RUNNING
                         and t.datetime_start is not None and t.params not in done
                         and (datetime.now() - t.datetime_start).total_seconds() < 0.4]  # fmt: skip
                if len(before) >= 2 and fresh:
                    break
        assert first.poll() is None, "the search ended before it could be killed: give it more steps"
        assert len(before) >= 2
        first.send_signal(signal.SIGKILL)
    finally:
        first.kill()
        first.wait()
    study = _study_of(out, postgres_url)
    killed = _counted(study)
    running = [t for t in study.get_trials() if t.state == optuna.trial.TrialState.RUNNING]
    assert running, "the kill landed between trials: nothing was left running to take over"
    resumed = subprocess.run(_search(out, postgres_url, "--trials", "8", "--steps", "900", "--pruner", "none", "--confirm", "0",
                                     "--resume"), cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    study = _study_of(out, postgres_url)
    after = _counted(study)
    assert len(after) == 8 and len({t.number for t in after}) == 8
    # nothing finished before the kill was lost or changed
    old = {t.number: (t.state, t.values, t.params) for t in killed}
    assert {n: (t.state, t.values, t.params) for t in after if (n := t.number) in old} == old
    # the trial the kill interrupted is marked, and ran again once
    interrupted = [t for t in study.get_trials() if t.user_attrs.get("interrupted")]
    assert {t.number for t in interrupted} == {t.number for t in running}
    retries = [t for t in after if "retry_of" in t.user_attrs]
    assert sorted(t.user_attrs["retry_of"] for t in retries) == sorted(t.number for t in running)
    csv = pd.read_csv(out / "trials.csv")
    assert csv["trial"].is_unique and set(csv["trial"]) >= {t.number for t in after}
