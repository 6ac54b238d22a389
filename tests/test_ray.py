"""The Ray Tune backend, end to end, on real Ray processes.

Everything that starts Ray runs inside a private network namespace that has only loopback (see
``tests/raycluster.py``). Searches run through the CLI, as users run them, on the seconds-scale
space of ``tests/data/tiny.yaml``. Every strategy on Ray (proposals, failures, kill -9 and
resume) is in ``tests/test_contract.py``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from attn_search.report.outputs import TRIAL_COLUMNS

from .raycluster import BIN, ROOT, Loopback, load_study, rows, wait_for

TINY = str(ROOT / "tests" / "data" / "tiny.yaml")
FINISHED = {"complete", "pruned", "failed"}


@pytest.fixture
def loopback() -> Iterator[Loopback]:
    ns = Loopback()
    try:
        yield ns
    finally:
        ns.close()


def search_cmd(out: Path, *extra: str, trials: int = 4, steps: int = 40, population: int = 1) -> list[str]:
    return [str(BIN / "python"), "run_search.py", "--space", TINY, "--backend", "ray", "--trials", str(trials),
            "--steps", str(steps), "--out", str(out), "--population", str(population), *extra]  # fmt: skip


@pytest.mark.slow  # about 60 s: Ray started twice; .ci/run runs the slow tests too
def test_embedded_ray_writes_the_local_backends_outputs(
    loopback: Loopback, ray_cluster: tuple[Loopback, str], tmp_path: Path
) -> None:
    out = tmp_path / "run"
    done = loopback.run(search_cmd(out, "--max-concurrent", "2", "--pruner", "none", trials=3, population=2))
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("trials.csv", "pareto.csv", "best_config.yaml", "pareto.png", "report.html", "study.db"):
        assert (out / name).stat().st_size > 0, name
    trials = rows(out)
    assert list(trials.columns)[: len(TRIAL_COLUMNS)] == TRIAL_COLUMNS  # one table whichever backend ran
    # the default preset confirms the front with 1 more seed after a Ray search too (in the driver)
    assert {"accuracy_search", "accuracy_sd", "seeds"} <= set(trials.columns)
    front = pd.read_csv(out / "pareto.csv")
    assert (front["seeds"] == 2).all()
    assert len(trials) == 3 and set(trials["state"]) <= FINISHED
    assert trials["node"].notna().all() and trials["node"].str.len().min() >= 16  # Ray node IDs
    # --population 2: trials 0 and 1 trained as one Ray trial, trial 2 alone, each recorded as its own trial
    assert list(trials["slot"]) == [0, 0, 2] and (trials["steps"] == 40).all()
    study = load_study(out)
    ray_ids = [t.user_attrs["ray_trial_id"] for t in study.trials if "ray_trial_id" in t.user_attrs]  # type: ignore[attr-defined]
    assert len(ray_ids) == 3 and ray_ids[0] == ray_ids[1] != ray_ids[2]
    complete = trials[trials["state"] == "complete"]
    assert len(complete) >= 1 and complete["accuracy"].between(0, 1).all() and (complete["flops"] > 0).all()
    # the report and export read the run like a local one
    from attn_search.export import export_run

    assert export_run(out, fmt="python").is_file()
    # a finished search resumed with more trials: the restored Tune experiment asks for them (Tune
    # had saved its searcher as finished, which stopped such a resume at once)
    more = loopback.run(search_cmd(out, "--max-concurrent", "2", "--pruner", "none", "--resume", "--confirm", "0",
                                   trials=4, population=2))  # fmt: skip
    assert more.returncode == 0, more.stderr[-3000:]
    assert "restored the Tune experiment" in more.stdout and len(rows(out)) == 4
    # one slot of 2: as its members end, the worker asks the driver for the next trials (refills),
    # each recorded as it ends; all four train in the one Ray trial
    refilled = tmp_path / "refilled"
    done = loopback.run(search_cmd(refilled, "--max-concurrent", "1", "--pruner", "none", "--confirm", "0", trials=4,
                                   steps=12, population=2))  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    trials = rows(refilled)
    assert len(trials) == 4 and (trials["state"] == "complete").all() and (trials["steps"] == 12).all()
    assert list(trials["slot"]) == [0, 0, 0, 0]
    ids = {t.user_attrs["ray_trial_id"] for t in load_study(refilled).trials}  # type: ignore[attr-defined]
    assert len(ids) == 1
    # a search whose first trials all fail the same way stops after 3 with the error, not in silence
    ns, address = ray_cluster
    broken = ns.run(search_cmd(tmp_path / "broken", "--task", "tests.custom_task:fragile", "--max-concurrent", "1",
                               "--address", address, trials=20))  # fmt: skip
    assert broken.returncode == 1, broken.stderr[-3000:]
    assert "first 3 trials all failed" in broken.stderr.strip().splitlines()[-1]
    failed = rows(tmp_path / "broken")
    assert list(failed["state"]) == ["failed"] * 3
    assert failed["reason"].str.contains("RuntimeError: fragile task: cannot make").all()
    assert (tmp_path / "broken" / "errors.log").read_text().count("Traceback") == 3


@pytest.mark.slow  # 12 s on 2 cores: keeps `make test` under 10 minutes
def test_a_worker_environment_that_cannot_import_the_package_stops_the_search(
    loopback: Loopback, tmp_path: Path
) -> None:
    """Workers whose environment cannot import the package (here: a broken torch first on the
    worker nodes' PYTHONPATH; the driver's is fine; the engine needs nothing else, so a broken
    gymnasium would no longer stop it) must stop the search in seconds with their error, not retry
    every trial in silence."""
    broken = tmp_path / "shadow" / "torch"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError('this environment has a broken torch')\n")
    port = "6391"
    env = {**loopback.env, "PYTHONPATH": f"{broken.parent}:{ROOT}"}
    head = subprocess.run(loopback.wrap(["ray", "start", "--head", f"--port={port}", "--num-cpus=2",
                                         "--include-dashboard=false", "--disable-usage-stats"]),
                          env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)  # fmt: skip
    assert head.returncode == 0, head.stderr[-2000:]
    start = time.time()
    done = loopback.run(search_cmd(tmp_path / "run", "--address", f"127.0.0.1:{port}", trials=4), timeout=300)
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert "Ray workers cannot run attn_search" in last and "broken torch" in last, last
    assert time.time() - start < 120
    assert rows(tmp_path / "run").empty  # no trial was burnt on it


@pytest.mark.slow  # about 20 s of Ray; .ci/run runs the slow tests too
def test_single_objective_search_with_asha_stops_at_the_time_budget(
    ray_cluster: tuple[Loopback, str], tmp_path: Path
) -> None:
    out = tmp_path / "run"
    ns, address = ray_cluster
    done = ns.run(search_cmd(out, "--compute", "none", "--time-budget", "12", "--max-concurrent", "2",
                             "--address", address, trials=200, steps=40))  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]  # the budget ended it, not an interrupt
    trials = rows(out)
    assert 2 <= len(trials) < 200 and set(trials["state"]) <= FINISHED
    assert "done:" in done.stdout and (out / "best_config.yaml").exists()


def test_bad_ray_flags_exit_2(
    ray_cluster: tuple[Loopback, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from attn_search.cli import search_main

    ns, address = ray_cluster
    done = ns.run(search_cmd(tmp_path / "a", "--cpus-per-trial", "64", "--address", address), timeout=120)
    assert done.returncode == 2 and "--cpus-per-trial 64.0: no node" in done.stderr, done.stderr[-2000:]
    assert not (tmp_path / "a").exists()  # the run dir this search created is removed again
    for args, message in (  # refused before Ray is involved: in process
        (["--backend", "ray", "--address", "127.0.0.1:1"], "--address 127.0.0.1:1: cannot join"),
        (["--cpus-per-trial", "2"], "--cpus-per-trial: only with --backend ray"),
        (["--backend", "ray", "--max-concurrent", "0"], "--max-concurrent"),
    ):
        try:
            status = search_main(["--space", TINY, *args, "--out", str(tmp_path / "b")])
        except SystemExit as exc:
            status = int(exc.code or 0)
        err = capsys.readouterr().err
        assert status == 2 and message in err and len(err.strip().splitlines()) == 1, (args, err)
        assert not (tmp_path / "b").exists()


def start_cluster(ns: Loopback) -> tuple[str, subprocess.Popen[str], str]:
    """A head node and a worker node, each with one CPU, as separate processes on 127.0.0.1.
    The worker runs with ``--block`` in its own session, so that the test can kill the whole node.
    Returns the address, the worker's process and the worker's node ID."""
    port = "6390"
    head = ns.run(["ray", "start", "--head", f"--port={port}", "--num-cpus=1", "--include-dashboard=false",
                   "--disable-usage-stats"])  # fmt: skip
    assert head.returncode == 0, head.stderr[-2000:]
    address = f"127.0.0.1:{port}"
    worker = ns.popen(["ray", "start", f"--address={address}", "--num-cpus=1", "--block", "--disable-usage-stats"],
                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    probe = [str(BIN / "python"), "-c", f"import ray; ray.init(address='{address}', logging_level='ERROR'); "
             "print(*[n['NodeID'] for n in ray.nodes() if n['Alive'] and 'node:__internal_head__' not in n['Resources']])"]  # fmt: skip
    found: list[str] = []
    wait_for(lambda: found.extend(ns.run(probe, timeout=60).stdout.split()) or found, 60, "the worker node to join")
    return address, worker, found[0]


@pytest.mark.slow  # about 100 s on 2 cores: two searches of real training on a two-node cluster
def test_two_node_cluster_spreads_trials_and_survives_a_dead_worker(loopback: Loopback, tmp_path: Path) -> None:
    address, worker, worker_node = start_cluster(loopback)
    # trials of seconds: Tune reuses a free actor, so 1-second trials could all run on the node
    # whose actor came up first
    first = loopback.run(search_cmd(tmp_path / "spread", "--address", address, "--pruner", "none", trials=4, steps=600))
    assert first.returncode == 0, first.stderr[-3000:]
    trials = rows(tmp_path / "spread")
    assert len(trials) == 4 and trials["node"].nunique() == 2, trials["node"]  # both nodes ran trials

    # second run: the worker node dies mid-search; its trial is retried on the head
    out = tmp_path / "kill"
    driver = loopback.popen(search_cmd(out, "--address", address, "--pruner", "none", trials=5, steps=700),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    # once a trial finished on the worker, Tune hands its actor the next trial: kill it during that one
    wait_for(lambda: (rows(out)["node"] == worker_node).any(), 240, "a finished trial on the worker node")
    before = rows(out)
    before = before[before["state"].isin(FINISHED)]  # (trials still running are listed too)
    assert len(before) < 5
    os.killpg(worker.pid, signal.SIGKILL)  # the raylet, object store and trial workers of that node
    killed = time.time()
    log, _ = driver.communicate(timeout=400)
    assert driver.returncode == 0, log[-3000:]
    after = rows(out)
    assert len(after) == 5 and set(after["state"]) <= {"complete"}, after[["state", "reason"]]
    kept = after.merge(before[["trial", "node", "accuracy"]], on=["trial", "node", "accuracy"])
    assert len(kept) == len(before)  # no finished trial lost
    study = load_study(out)
    later = [t.user_attrs["node"] for t in study.trials  # type: ignore[attr-defined]
             if "node" in t.user_attrs and t.datetime_complete.timestamp() > killed + 2]  # fmt: skip
    assert later and worker_node not in later  # only the head was left
    assert "its worker died; retrying it" in log  # the trial running on the dead node ran again


def test_the_local_backend_never_imports_ray(tmp_path: Path) -> None:
    code = (
        "import sys; from attn_search.search.loop import SearchOptions, run_search; "
        f"run_search(SearchOptions(space={TINY!r}, trials=1, steps=4, out={str(tmp_path / 'run')!r}, quiet=True)); "
        "assert 'ray' not in sys.modules, 'ray was imported'"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def last_json(text: str) -> dict[str, object]:

    return json.loads(text.strip().splitlines()[-1])  # type: ignore[no-any-return]


@pytest.mark.slow  # about a minute: two benchmark scripts, each starting Ray twice
def test_ray_benchmarks_run_on_the_cpu_path(loopback: Loopback) -> None:
    py = str(BIN / "python")
    packing = loopback.run([py, "benchmarks/gpu_packing.py", "--no-netns", "--device", "cpu", "--space", TINY,
                            "--trials", "2", "--packings", "1", "2", "--steps", "6"])  # fmt: skip
    assert packing.returncode == 0, packing.stderr[-3000:]
    report = last_json(packing.stdout)
    assert report["gpus"] == 0 and [r["per_device"] for r in report["results"]] == [1, 2]  # type: ignore[index]
    for r in report["results"]:  # type: ignore[attr-defined]
        assert r["complete"] == 2 and r["trials_per_hour"] > 0 and r["peak_mem_mb"] > 0 and r["device"] == "cpu"
    overhead = loopback.run([py, "benchmarks/ray_overhead.py", "--no-netns", "--space", TINY, "--trials", "2",
                             "--steps", "6"])  # fmt: skip
    assert overhead.returncode == 0, overhead.stderr[-3000:]
    figures = last_json(overhead.stdout)
    assert figures["local_complete"] == figures["ray_complete"] == 2 and figures["speedup"] > 0  # type: ignore[operator]


def _ray_workers(ns: Loopback, prefix: str = "ray::ImplicitFunc") -> list[int]:
    """PIDs of the processes in the namespace ``ns`` whose command line starts with ``prefix``
    (default: Tune's trainables; ``""``: every process but the namespace's holder)."""
    mine = os.readlink(f"/proc/{ns.holder.pid}/ns/net")
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.readlink(entry / "ns" / "net") != mine:
                continue
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if cmd.startswith(prefix) and int(entry.name) != ns.holder.pid:
            found.append(int(entry.name))
    return found


@pytest.mark.slow  # about 60 s: a Ray cluster and a killed worker; .ci/run runs the slow tests too
def test_a_population_whose_ray_worker_is_killed_loses_and_duplicates_nothing(
    loopback: Loopback, tmp_path: Path
) -> None:
    """A Ray trial training a population of 2 (with refills) loses its worker to SIGKILL: the
    search completes, the killed population's members are retried or failed with a reason, and no
    finished trial is lost or counted twice; then the driver itself is killed and ``--resume``
    continues the run to its trial count."""
    out = tmp_path / "run"
    args = ("--max-concurrent", "1", "--pruner", "none", "--confirm", "0")
    driver = loopback.popen(search_cmd(out, *args, trials=6, steps=400, population=2),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    wait_for(lambda: len(rows(out).query("state in @FINISHED")) >= 2 and _ray_workers(loopback), 240,
             "two finished members and a live population worker")  # fmt: skip
    before = rows(out).query("state in @FINISHED")
    for pid in _ray_workers(loopback):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    log, _ = driver.communicate(timeout=400)
    assert driver.returncode == 0, log[-3000:]
    after = rows(out)
    assert after["trial"].is_unique and len(after) == 6, after[["trial", "state", "reason"]]
    assert set(after["state"]) <= {"complete", "failed"}
    failed = after[after["state"] == "failed"]
    assert failed["reason"].str.contains("worker").all(), failed["reason"]
    kept = after.merge(before[["trial", "state", "accuracy"]], on=["trial", "state", "accuracy"])
    assert len(kept) == len(before)  # no finished member lost or changed
    assert "its worker died; retrying it" in log

    # the driver killed with SIGKILL mid-search: --resume continues to the trial count
    again = tmp_path / "resumed"
    driver = loopback.popen(search_cmd(again, *args, trials=6, steps=400, population=2),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    wait_for(lambda: len(rows(again).query("state in @FINISHED")) >= 2, 240, "two finished members")
    driver.kill()
    driver.wait()
    done_before = rows(again).query("state in @FINISHED")
    for pid in _ray_workers(loopback, ""):  # the embedded Ray the driver started dies with it, as on a machine reboot
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    resumed = loopback.run(search_cmd(again, *args, "--resume", trials=6, steps=400, population=2), timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    final = rows(again)
    counted = final[final["state"].isin(FINISHED)]
    assert counted["trial"].is_unique and len(counted) == 6, final[["trial", "state", "reason"]]
    kept = final.merge(done_before[["trial", "state", "accuracy"]], on=["trial", "state", "accuracy"])
    assert len(kept) == len(done_before)
