"""A run dir's own files: the lock that allows one search at a time, and the run record.

One process per run dir: an exclusive lock held for the whole search.

The lock is an ``flock`` on ``RUN_DIR/.lock``. The kernel releases it when the process that holds
it exits, however it exits (``kill -9`` included), so a lock that can be taken proves that no
search is running in the run dir any more: whatever its trials left ``RUNNING`` is dead. A second
search on a live run dir is refused in one line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import socket
from pathlib import Path
from typing import Any

from attn_search.engine.trainer import Budget
from attn_search.errors import UsageError

LOCK_FILE = ".lock"


class RunLock:
    """Exclusive lock on a run dir (see the module docstring)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK_FILE
        self.fd: int | None = None

    @property
    def owner(self) -> str:
        """``host:pid`` of this process (written into the lock file)."""
        return f"{socket.gethostname()}:{os.getpid()}"

    def acquire(self) -> RunLock:
        """Take the lock or raise :class:`UsageError` naming the search that holds it."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise UsageError(
                f"--out {self.path.parent} is in use by another search ({holder}): wait for it to end, "
                "or choose another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, self.owner.encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


RUN_FILE = "run.json"
DEFAULT_STUDY_NAME = "attn_search"
"""The study name of runs made before each run had its own (a ``run.json`` without ``study_name``)."""


@dataclasses.dataclass(frozen=True)
class RunRecord:
    """``run.json``: what a run was started with (its space, options, task, budget, study), written
    once when the run starts and read back through this one type by ``--resume``, ``report``,
    ``export``, ``confirm`` and the report (no reader digs in the JSON itself)."""

    space: str
    space_fingerprint: str
    space_definition: dict[str, Any]
    options: dict[str, Any]
    """The search's options as given (what ``run_search.py`` printed back): read through the
    properties below."""
    task: str | None = None
    """The task actually searched (``None``: the space's)."""
    task_params: dict[str, Any] = dataclasses.field(default_factory=dict)
    budget: dict[str, Any] = dataclasses.field(default_factory=dict)
    hypervolume_bounds: dict[str, Any] = dataclasses.field(default_factory=dict)
    study_name: str = DEFAULT_STUDY_NAME
    created: float = 0.0

    @property
    def select(self) -> str:
        """The selection rule of ``best_config.yaml`` (``report --select`` makes a new one the run's)."""
        return str(self.options.get("select") or "knee")

    @property
    def storage(self) -> str | None:
        """``--storage`` (``None``: the run dir's ``study.db``)."""
        return self.options.get("storage")

    @property
    def population(self) -> int | None:
        return self.options.get("population")

    @property
    def target_len(self) -> int | None:
        return self.options.get("target_len")

    @property
    def compute(self) -> str | None:
        """The ``--compute`` choice the run searched with (``None``: a run from before it was recorded)."""
        return self.options.get("compute")

    @property
    def constrained(self) -> bool:
        """Whether the search had a compute constraint (``--max-flops``, ``--max-latency-ms``)."""
        return self.options.get("max_flops") is not None or self.options.get("max_latency_ms") is not None

    def budget_for(self, **changes: Any) -> Budget:
        """The trials' training budget (no time limit: a retrain runs whole), with ``changes``."""
        fields = {f.name for f in dataclasses.fields(Budget)}
        saved = {k: v for k, v in self.budget.items() if k in fields and k != "time_limit_s"}
        return dataclasses.replace(Budget(**saved), **changes)

    def with_select(self, select: str) -> RunRecord:
        return dataclasses.replace(self, options={**self.options, "select": select})

    @classmethod
    def read(cls, run_dir: str | Path) -> RunRecord:
        """The record of ``run_dir``; ``ValueError`` if it holds none (or a broken one)."""
        path = Path(run_dir) / RUN_FILE
        if not path.is_file():
            raise ValueError(f"{run_dir} is not an attn_search run dir (no {RUN_FILE})")
        try:
            data = json.loads(path.read_text())
            known = {f.name for f in dataclasses.fields(cls)}
            return cls(**{k: v for k, v in data.items() if k in known})
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{path} is not a readable run record: {exc}") from exc

    def write(self, run_dir: str | Path) -> None:
        """Write ``run.json`` atomically (a reader never sees half of it)."""
        path = Path(run_dir) / RUN_FILE
        tmp = path.with_name(f".{RUN_FILE}.tmp")
        tmp.write_text(json.dumps(dataclasses.asdict(self), indent=2, default=str))
        os.replace(tmp, path)
