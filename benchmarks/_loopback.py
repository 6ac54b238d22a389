"""Run a benchmark that starts Ray inside a private network namespace with only loopback.

Ray binds the machine's interface address; on machines where only loopback may be a target (CI,
these 2-core boxes) a benchmark re-executes itself under ``unshare -n`` (root, or a user namespace
with ``-r``), where Ray uses 127.0.0.1. ``--no-netns`` (or ``ATTN_SEARCH_NETNS=off``) skips it.
"""

from __future__ import annotations

import os
import shutil
import sys


def only_loopback() -> bool:
    try:
        return set(os.listdir("/sys/class/net")) <= {"lo"}
    except OSError:
        return False


def ensure_loopback_namespace() -> None:
    """Re-execute this script in a loopback-only network namespace unless it already runs in one."""
    if "--no-netns" in sys.argv:
        sys.argv.remove("--no-netns")
        return
    if os.environ.get("ATTN_SEARCH_NETNS") == "off" or only_loopback() or not shutil.which("unshare"):
        return
    os.environ["ATTN_SEARCH_NETNS"] = "off"  # once
    flags = ["-n"] if os.geteuid() == 0 else ["-r", "-n"]
    script = 'ip link set lo up && exec "$0" "$@"'
    os.execvp("unshare", ["unshare", *flags, "sh", "-c", script, sys.executable, *sys.argv])
