"""The failure policy, one for every backend and strategy.

A trial that raises is recorded ``failed`` with the exception's type and message as its reason,
and the search goes on: one bad configuration must not throw away a long search. The full
traceback goes to ``errors.log`` in the run dir. But when the *first* trials of a search all fail
with the same error before any trial got through, the setup itself is broken (a missing package on
the workers, a task that cannot generate data, a device that cannot run the model), and going on
would only burn the budget: the search stops with that error (exit status 1).

A trial that trains and ends ``failed`` without raising (a non-finite loss) is a result, not an
error: it shows the setup works and disarms the rule.
"""

from __future__ import annotations

import dataclasses
import re
import time
import traceback
from pathlib import Path
from typing import Any

from attn_search.engine import metrics as M
from attn_search.errors import SearchAborted

__all__ = ["ERROR_LOG", "FIRST_FAILURES", "FailurePolicy", "SearchAborted", "describe", "error_attrs", "log_error"]

ERROR_LOG = "errors.log"
FIRST_FAILURES = 3
"""Failures in a row, before any trial got through, that stop a search."""


def describe(exc: BaseException) -> str:
    """``Type: message`` on one line (the message's first line, at most 300 characters)."""
    lines = str(exc).strip().splitlines()
    first = lines[0].strip() if lines else ""
    text = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def error_attrs(exc: BaseException) -> dict[str, Any]:
    """What a trial that raised records: state, reason and the traceback (for ``errors.log``)."""
    return {
        "state": M.FAILED,
        "reason": describe(exc),
        "error": type(exc).__name__,
        "traceback": "".join(traceback.format_exception(exc)),
    }


def _signature(reason: str) -> str:
    """Errors that differ only in numbers (sizes, ids, addresses) count as the same error."""
    return re.sub(r"\d+", "#", reason)


@dataclasses.dataclass
class FailurePolicy:
    """Decides, trial by trial, whether a search must stop (see the module docstring).

    Args:
        limit: failures in a row with the same error that stop the search.
        armed: ``False`` once a trial got through (on resume: if the run already has one).
    """

    limit: int = FIRST_FAILURES
    armed: bool = True
    streak: list[str] = dataclasses.field(default_factory=list)

    def observe(self, state: str, attrs: dict[str, Any]) -> str | None:
        """Take one finished trial; return the message to stop the search with, or ``None``."""
        if not self.armed:
            return None
        if state == M.FAILED and "error" not in attrs and "metrics" not in attrs:
            return None  # refused before it ran (an invalid configuration): says nothing about the setup
        if state != M.FAILED or "error" not in attrs:
            self.armed = False  # a trial got through (or trained and diverged): the setup works
            self.streak.clear()
            return None
        reason = str(attrs.get("reason", attrs["error"]))
        if self.streak and _signature(self.streak[-1]) != _signature(reason):
            self.streak.clear()
        self.streak.append(reason)
        if len(self.streak) < self.limit:
            return None
        return f"the first {len(self.streak)} trials all failed with the same error, so the search stopped: {reason}"


def log_error(run_dir: Path, trial: int | str, attrs: dict[str, Any]) -> None:
    """Append a failed trial's traceback to the run dir's ``errors.log``."""
    tb = attrs.get("traceback")
    if not tb:
        return
    config = attrs.get("config", {})
    head = f"=== trial {trial} at {time.strftime('%Y-%m-%d %H:%M:%S')}: {attrs.get('reason', '')}\n"
    with open(run_dir / ERROR_LOG, "a") as f:
        f.write(head + (f"config: {config}\n" if config else "") + tb.rstrip() + "\n\n")
