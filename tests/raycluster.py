"""Ray processes for tests: a network namespace that has only loopback, shared by a test module.

Everything that starts Ray runs inside a private network namespace (Ray binds the machine's
interface address otherwise): :class:`Loopback` holds one open with ``unshare -n`` and runs
commands in it with ``nsenter``. It needs root, as CI has.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


class Loopback:
    """A network namespace with only loopback, kept open by a sleeping process; Ray state under a
    private ``RAY_TMPDIR`` and ``HOME`` (the auth token), removed with every Ray process at exit."""

    def __init__(self) -> None:
        self.holder = subprocess.Popen(["unshare", "-n", "sh", "-c", "ip link set lo up && exec sleep 100000"])
        self.root = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: Ray's socket paths are length-limited
        # CONTRACT_CRASH_POINTER: where the contract test tells Ray's workers its marker (tests/contract_eval.py)
        self.env = {**os.environ, "RAY_TMPDIR": str(self.root / "t"), "HOME": str(self.root / "home"),
                    "RAY_AUTH_MODE": "token", "PYTHONPATH": str(ROOT), "PATH": f"{BIN}:{os.environ['PATH']}",
                    "CONTRACT_CRASH_POINTER": str(self.root / "contract-crash")}  # fmt: skip
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
        """Kill every process in this namespace (Ray's, the searches'), then the namespace. Not
        ``ray stop``: that stops every Ray instance on the machine, other namespaces' too."""
        mine = os.readlink(f"/proc/{self.holder.pid}/ns/net")
        for _ in range(3):
            for entry in Path("/proc").iterdir():
                if not entry.name.isdigit() or int(entry.name) == self.holder.pid:
                    continue
                try:
                    if os.readlink(entry / "ns" / "net") == mine:
                        os.kill(int(entry.name), signal.SIGKILL)
                except (OSError, ProcessLookupError):
                    continue
            time.sleep(0.2)
        self.holder.kill()
        self.holder.wait()
        shutil.rmtree(self.root, ignore_errors=True)


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


def start_head(ns: Loopback, port: int, *, cpus: int = 2) -> str:
    """A one-node cluster (``ray start --head``) in the namespace; returns its address."""
    head = ns.run(["ray", "start", "--head", f"--port={port}", f"--num-cpus={cpus}", "--include-dashboard=false",
                   "--disable-usage-stats"])  # fmt: skip
    assert head.returncode == 0, head.stderr[-2000:]
    return f"127.0.0.1:{port}"


def load_study(out: Path) -> object:
    """A run dir's Optuna study (each run has its own study name, in run.json)."""
    from attn_search.report.outputs import load_run

    return load_run(out)[0]
