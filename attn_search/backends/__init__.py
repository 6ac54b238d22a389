"""Where trials run: backends behind one interface (:class:`~attn_search.backends.base.Backend`).

``local`` runs trials in this process; ``ray`` runs them as Ray Tune trials on the cores and GPUs
of one machine or a cluster (imported only when used: Ray is an optional extra).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from attn_search.backends.base import Backend, Event, Finished, Job, Note, TrialOutcome, TrialRunner
from attn_search.backends.local import LocalBackend
from attn_search.errors import UsageError

BACKENDS = ("local", "ray")

__all__ = [
    "BACKENDS",
    "Backend",
    "Event",
    "Finished",
    "Job",
    "LocalBackend",
    "Note",
    "TrialOutcome",
    "TrialRunner",
    "make_backend",
]


def make_backend(name: str, *, run_dir: Path, resume: bool, ray_options: Any = None) -> Backend:
    """The backend called ``name``; ``ray_options`` is a :class:`~attn_search.backends.ray_tune.RayOptions`."""
    if name == "local":
        return LocalBackend()
    if name == "ray":
        try:
            from attn_search.backends.ray_tune import RayBackend, RayOptions
        except ImportError as exc:
            raise UsageError(f"--backend ray needs Ray Tune ({exc}): pip install '.[ray]'") from exc
        return RayBackend(ray_options or RayOptions(), run_dir=run_dir, resume=resume)
    raise UsageError(f"--backend {name!r} is unknown: use one of {', '.join(BACKENDS)}")
