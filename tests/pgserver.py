"""A PostgreSQL server for tests, on loopback.

``ATTN_SEARCH_TEST_POSTGRES`` (a ``postgresql://`` URL of a superuser, as ``.ci/run`` exports after
starting Debian's server) is used when set. Otherwise, where Debian's ``postgresql`` package is
installed, a throwaway cluster is started as the ``postgres`` user (its server refuses root) in a
temporary dir on a free port and stopped afterwards. Each test gets a database of its own.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

ENV = "ATTN_SEARCH_TEST_POSTGRES"


def _binaries() -> str | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return os.path.dirname(found[-1]) if found else None


def unavailable() -> str | None:
    """Why no server can be had here, or ``None``."""
    if os.environ.get(ENV):
        return None
    if _binaries() is None:
        return f"no PostgreSQL: set {ENV} or install Debian's postgresql (.ci/run does)"
    if os.geteuid() != 0 and shutil.which("su") is None:
        return "PostgreSQL's binaries are here but the server cannot be started as its own user"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _as_postgres(cmd: str) -> None:
    argv = ["su", "postgres", "-s", "/bin/sh", "-c", cmd] if os.geteuid() == 0 else ["sh", "-c", cmd]
    subprocess.run(argv, check=True, capture_output=True, timeout=120)


@contextmanager
def server() -> Iterator[str]:
    """A superuser URL of a running server (without a database name)."""
    given = os.environ.get(ENV)
    if given:
        yield given.rsplit("/", 1)[0]
        return
    bindir = _binaries()
    assert bindir is not None, unavailable()
    root = tempfile.mkdtemp(prefix="attn-pg-")
    os.chmod(root, 0o777)
    data, port = os.path.join(root, "data"), _free_port()
    _as_postgres(f"{bindir}/initdb -D {data} -U postgres --auth=trust -E UTF8 >/dev/null")
    _as_postgres(
        f"{bindir}/pg_ctl -D {data} -w -l {root}/log -o '-h 127.0.0.1 -p {port} -k {root} -c max_connections=200' start"
    )
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}"
    finally:
        _as_postgres(f"{bindir}/pg_ctl -D {data} -m immediate stop")
        shutil.rmtree(root, ignore_errors=True)


def new_database(base: str) -> str:
    """A fresh, empty database on the server at ``base``: its URL."""
    import psycopg

    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(f"{base}/postgres", autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return f"{base}/{name}"


def drop_database(url: str) -> None:
    """Drop the database at ``url`` (made by :func:`new_database`), closing what still holds it."""
    import psycopg

    base, name = url.rsplit("/", 1)
    with psycopg.connect(f"{base}/postgres", autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
