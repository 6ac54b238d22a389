"""One process per run dir: an exclusive lock held for the whole search.

The lock is an ``flock`` on ``RUN_DIR/.lock``. The kernel releases it when the process that holds
it exits, however it exits (``kill -9`` included), so a lock that can be taken proves that no
search is running in the run dir any more: whatever its trials left ``RUNNING`` is dead. A second
search on a live run dir is refused in one line.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from pathlib import Path

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
