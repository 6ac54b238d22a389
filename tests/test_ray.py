"""The Ray Tune backend, end to end, on real Ray processes.

Everything that starts Ray runs inside a private network namespace that has only loopback (Ray
binds the machine's interface address otherwise): :class:`Loopback` holds one open with
``unshare -n`` and runs commands in it with ``nsenter``. Searches run through the CLI, as users
run them, on the seconds-scale space of ``tests/data/tiny.yaml``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "tests" / "data" / "tiny.yaml")
BIN = Path(sys.executable).parent
FINISHED = {"complete", "pruned", "failed"}


class Loopback:
    """A network namespace with only loopback, kept open by a sleeping process; Ray state under a
    private ``RAY_TMPDIR`` and ``HOME`` (the auth token), removed with every Ray process at exit."""

    def __init__(self) -> None:
        self.holder = subprocess.Popen(["unshare", "-n", "sh", "-c", "ip link set lo up && exec sleep 100000"])
        self.root = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: Ray's socket paths are length-limited
        self.env = {**os.environ, "RAY_TMPDIR": str(self.root / "t"), "HOME": str(self.root / "home"),
                    "RAY_AUTH_MODE": "token", "PYTHONPATH": str(ROOT), "PATH": f"{BIN}:{os.environ['PATH']}"}  # fmt: skip
        for _ in range(50):
            up = subprocess.run(self.wrap(["ip", "-o", "link", "show", "lo"]), capture_output=True, text=True)
            if "UP" in up.stdout:
                break
            time.sleep(0.1)
        else:
            self.holder.kill()
            raise AssertionError(
                "could not open a loopback-only network namespace (`unshare -n` + `nsenter`, run as root, as CI "
                f"does): {up.stderr.strip()[:300]}"
            )
        self.run(["ray", "get-auth-token", "--generate"])

    def wrap(self, cmd: list[str]) -> list[str]:
        return ["nsenter", "-t", str(self.holder.pid), "-n", "--", *cmd]

    def run(self, cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.wrap(cmd), env=self.env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)

    def popen(self, cmd: list[str], **kw: object) -> subprocess.Popen[str]:
        return subprocess.Popen(self.wrap(cmd), env=self.env, text=True, cwd=ROOT, **kw)  # type: ignore[call-overload]

    def close(self) -> None:
        self.run(["ray", "stop", "--force"], timeout=60)
        self.holder.kill()
        self.holder.wait()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def loopback() -> Iterator[Loopback]:
    ns = Loopback()
    try:
        yield ns
    finally:
        ns.close()


def search_cmd(out: Path, *extra: str, trials: int = 4, steps: int = 40) -> list[str]:
    return [str(BIN / "python"), "run_search.py", "--space", TINY, "--backend", "ray", "--trials", str(trials),
            "--steps", str(steps), "--out", str(out), *extra]  # fmt: skip


def rows(out: Path) -> pd.DataFrame:
    path = out / "trials.csv"
    return pd.read_csv(path) if path.exists() else pd.DataFrame(columns=["trial", "state", "node"])


def wait_for(predicate: object, timeout: float, what: str) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def test_embedded_ray_writes_the_local_backends_outputs(loopback: Loopback, tmp_path: Path) -> None:
    out = tmp_path / "run"
    done = loopback.run(search_cmd(out, "--max-concurrent", "2", trials=5))
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("trials.csv", "pareto.csv", "best_config.yaml", "pareto.png", "report.html", "study.db"):
        assert (out / name).stat().st_size > 0, name
    trials = rows(out)
    local = loopback.run([str(BIN / "python"), "run_search.py", "--space", TINY, "--trials", "1", "--steps", "10",
                          "--out", str(tmp_path / "local")])  # fmt: skip
    assert local.returncode == 0, local.stderr[-2000:]
    assert list(trials.columns) == list(rows(tmp_path / "local").columns)  # same table whichever backend ran
    assert len(trials) == 5 and set(trials["state"]) <= FINISHED
    assert trials["node"].notna().all() and trials["node"].str.len().min() >= 16  # Ray node IDs
    complete = trials[trials["state"] == "complete"]
    assert len(complete) >= 1 and complete["accuracy"].between(0, 1).all() and (complete["flops"] > 0).all()
    # the report and export read the run like a local one
    exported = loopback.run([str(BIN / "attn-search"), "export", str(out), "--format", "python"])
    assert exported.returncode == 0, exported.stderr
    # a search whose first trials all fail the same way stops after 3 with the error, not in silence
    broken = loopback.run(search_cmd(tmp_path / "broken", "--task", "tests.custom_task:fragile", "--max-concurrent",
                                     "1", trials=20))  # fmt: skip
    assert broken.returncode == 1, broken.stderr[-3000:]
    assert "first 3 trials all failed" in broken.stderr.strip().splitlines()[-1]
    failed = rows(tmp_path / "broken")
    assert list(failed["state"]) == ["failed"] * 3
    assert failed["reason"].str.contains("RuntimeError: fragile task: cannot make").all()
    assert (tmp_path / "broken" / "errors.log").read_text().count("Traceback") == 3


def holed_table(tmp_path: Path) -> Path:
    """The recorded sparse table without its window rows of lr 0.006: those proposals raise."""
    full = pd.read_csv(ROOT / "tables" / "sparse-smoke.csv", comment="#")
    holed = full[~((full["pattern"] == "window") & (full["lr"] == 0.006))]
    path = tmp_path / "holed.csv"
    holed.to_csv(path, index=False)
    return path


def test_trials_that_raise_on_ray_are_recorded_failed_and_the_search_goes_on(
    loopback: Loopback, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    cmd = [str(BIN / "python"), "run_search.py", "--space", "sparse", "--backend", "ray", "--strategy", "random",
           "--evaluator", f"table:{holed_table(tmp_path)}", "--trials", "16", "--max-concurrent", "2", "--seed", "1",
           "--out", str(out)]  # fmt: skip
    done = loopback.run(cmd)
    assert done.returncode == 0, done.stderr[-3000:]
    trials = rows(out)
    failed = trials[trials["state"] == "failed"]
    assert len(trials) == 16 and 1 <= len(failed) < 16, trials[["pattern", "lr", "state"]]
    assert ((failed["pattern"] == "window") & (failed["lr"] == 0.006)).all()
    assert failed["reason"].str.startswith("KeyError: ").all() and failed["reason"].str.contains("has no row").all()


def test_a_worker_environment_that_cannot_import_the_package_stops_the_search(
    loopback: Loopback, tmp_path: Path
) -> None:
    """Workers whose environment cannot import the package (here: a broken gymnasium first on the
    worker nodes' PYTHONPATH; the driver's is fine) must stop the search in seconds with their
    error, not retry every trial in silence."""
    broken = tmp_path / "shadow" / "gymnasium"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError('this environment has a broken gymnasium')\n")
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
    assert "Ray workers cannot run attn_search" in last and "broken gymnasium" in last, last
    assert time.time() - start < 120
    assert rows(tmp_path / "run").empty  # no trial was burnt on it


def test_single_objective_search_with_asha_stops_at_the_time_budget(loopback: Loopback, tmp_path: Path) -> None:
    out = tmp_path / "run"
    done = loopback.run(search_cmd(out, "--compute", "none", "--time-budget", "12", "--max-concurrent", "2",
                                   trials=200, steps=40))  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]  # the budget ended it, not an interrupt
    trials = rows(out)
    assert 2 <= len(trials) < 200 and set(trials["state"]) <= FINISHED
    assert "done:" in done.stdout and (out / "best_config.yaml").exists()


def test_bad_ray_flags_exit_2(loopback: Loopback, tmp_path: Path) -> None:
    for cmd, message in (
        (search_cmd(tmp_path / "a", "--cpus-per-trial", "64"), "--cpus-per-trial 64.0: no node"),
        (search_cmd(tmp_path / "b", "--address", "127.0.0.1:1"), "--address 127.0.0.1:1: cannot join"),
        (
            [str(BIN / "python"), "run_search.py", "--space", TINY, "--cpus-per-trial", "2"],
            "--cpus-per-trial: only with --backend ray",
        ),
        (search_cmd(tmp_path / "c", "--max-concurrent", "0"), "--max-concurrent"),
    ):
        done = loopback.run(cmd, timeout=120)
        assert done.returncode == 2, (cmd, done.stderr[-2000:])
        assert message in done.stderr and len(done.stderr.strip().splitlines()[-1]) > 0


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


def test_two_node_cluster_spreads_trials_and_survives_a_dead_worker(loopback: Loopback, tmp_path: Path) -> None:
    import optuna

    address, worker, worker_node = start_cluster(loopback)
    # trials of seconds: Tune reuses a free actor, so 1-second trials could all run on the node
    # whose actor came up first
    first = loopback.run(search_cmd(tmp_path / "spread", "--address", address, "--pruner", "none", trials=6, steps=800))
    assert first.returncode == 0, first.stderr[-3000:]
    trials = rows(tmp_path / "spread")
    assert len(trials) == 6 and trials["node"].nunique() == 2, trials["node"]  # both nodes ran trials

    # second run: the worker node dies mid-search; its trial is retried on the head
    out = tmp_path / "kill"
    driver = loopback.popen(search_cmd(out, "--address", address, "--pruner", "none", trials=6, steps=800),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    # once a trial finished on the worker, Tune hands its actor the next trial: kill it during that one
    wait_for(lambda: (rows(out)["node"] == worker_node).any(), 240, "a finished trial on the worker node")
    before = rows(out)
    assert len(before) < 6
    os.killpg(worker.pid, signal.SIGKILL)  # the raylet, object store and trial workers of that node
    killed = time.time()
    log, _ = driver.communicate(timeout=400)
    assert driver.returncode == 0, log[-3000:]
    after = rows(out)
    assert len(after) == 6 and set(after["state"]) <= {"complete"}, after[["state", "reason"]]
    kept = after.merge(before[["trial", "node", "accuracy"]], on=["trial", "node", "accuracy"])
    assert len(kept) == len(before)  # no finished trial lost
    study = optuna.load_study(study_name="attn_search", storage=f"sqlite:///{out / 'study.db'}")
    later = [t.user_attrs["node"] for t in study.trials if t.datetime_complete.timestamp() > killed + 2]
    assert later and worker_node not in later  # only the head was left
    assert "its worker died; retrying it" in log  # the trial running on the dead node ran again


def test_interrupted_ray_search_resumes_its_experiment(loopback: Loopback, tmp_path: Path) -> None:
    import optuna

    out = tmp_path / "run"
    cmd = search_cmd(out, "--max-concurrent", "2", "--pruner", "none", trials=6, steps=150)
    driver = loopback.popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    wait_for(lambda: len(rows(out)) >= 2, 240, "two finished trials")
    driver.send_signal(signal.SIGINT)
    time.sleep(2)
    driver.kill()  # SIGKILL, whether or not Ray Tune had finished stopping
    driver.wait()
    loopback.run(["ray", "stop", "--force"])  # what the embedded Ray instance left behind
    before = rows(out)
    started = {p.name.removeprefix("trial_") for p in (out / "ray").glob("trial_*")}
    assert 2 <= len(before) < 6
    resumed = loopback.run([*cmd, "--resume"], timeout=400)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    after = rows(out)
    assert len(after) == 6 and set(after["state"]) == {"complete"}
    assert after.merge(before, on=["trial", "node", "accuracy", "lr"]).shape[0] == len(before)  # none lost
    study = optuna.load_study(study_name="attn_search", storage=f"sqlite:///{out / 'study.db'}")
    ids = [t.user_attrs["ray_trial_id"] for t in study.trials]
    assert len(set(ids)) == 6  # each Ray trial recorded once
    # Tuner.restore continued the experiment: trials it had started before the kill finished after it
    assert set(ids[len(before) :]) & started


def test_ppo_on_ray_evaluates_a_vector_step_in_parallel(loopback: Loopback, tmp_path: Path) -> None:
    import optuna

    out = tmp_path / "ppo"
    done = loopback.run(search_cmd(out, "--strategy", "ppo", "--max-concurrent", "2", trials=6, steps=60))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "agent acting in 2 environment(s)" in done.stdout
    trials = rows(out)
    assert len(trials) == 6 and set(trials["state"]) <= FINISHED
    assert (out / "agent.zip").stat().st_size > 0
    study = optuna.load_study(study_name="attn_search", storage=f"sqlite:///{out / 'study.db'}")
    spans = [(t.datetime_start, t.datetime_complete) for t in study.trials]
    # the two proposals of each vector step trained at the same time
    overlaps = sum(a[0] < b[1] and b[0] < a[1] for a, b in zip(spans[::2], spans[1::2], strict=True))
    assert overlaps >= 2, spans


def test_the_local_backend_never_imports_ray(tmp_path: Path) -> None:
    code = (
        "import sys; from attn_search.search import SearchOptions, run_search; "
        f"run_search(SearchOptions(space={TINY!r}, trials=1, steps=4, out={str(tmp_path / 'run')!r}, quiet=True)); "
        "assert 'ray' not in sys.modules, 'ray was imported'"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def last_json(text: str) -> dict[str, object]:
    import json

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
