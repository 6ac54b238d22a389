"""Where trials run: backends behind one interface (:class:`~attn_search.backends.base.Backend`).

``local`` runs trials in this process; ``ray`` runs them as Ray Tune trials on the cores and GPUs
of one machine or a cluster (imported only when used: Ray is an optional extra).
"""

from __future__ import annotations

from pathlib import Path

from attn_search.backends.base import (
    AtRung,
    Backend,
    BackendOptions,
    Event,
    Finished,
    Job,
    Note,
    SlotRun,
    Started,
    TrialOutcome,
    TrialRunner,
    Vacant,
)
from attn_search.backends.local import LocalBackend
from attn_search.errors import UsageError

BACKENDS = ("local", "ray")

__all__ = [
    "BACKENDS",
    "AtRung",
    "Backend",
    "BackendOptions",
    "Event",
    "Finished",
    "Job",
    "LocalBackend",
    "Note",
    "SlotRun",
    "Started",
    "TrialOutcome",
    "TrialRunner",
    "Vacant",
    "check_backend",
    "make_backend",
]


def check_backend(name: str, options: BackendOptions) -> None:
    """Refuse flags this backend does not take, and values it cannot use (``ValueError`` naming the flag)."""
    if name not in BACKENDS:
        raise ValueError(f"--backend {name!r} is unknown: use one of {', '.join(BACKENDS)}")
    if name == "local":
        default = BackendOptions(device=options.device)
        given = [flag for flag, field in (("--address", "address"), ("--cpus-per-trial", "cpus_per_trial"),
                 ("--gpus-per-trial", "gpus_per_trial"), ("--max-concurrent", "max_concurrent"))
                 if getattr(options, field) != getattr(default, field)]  # fmt: skip
        if given:
            raise ValueError(f"{', '.join(given)}: only with --backend ray (add --backend ray)")
        return
    if options.cpus_per_trial <= 0:
        raise ValueError(f"--cpus-per-trial {options.cpus_per_trial} is invalid: it must be > 0")
    if options.gpus_per_trial is not None and options.gpus_per_trial < 0:
        raise ValueError(f"--gpus-per-trial {options.gpus_per_trial} is invalid: it must be >= 0")
    if options.max_concurrent is not None and options.max_concurrent < 1:
        raise ValueError(f"--max-concurrent {options.max_concurrent} is invalid: it must be at least 1")


def make_backend(name: str, *, run_dir: Path, resume: bool, options: BackendOptions | None = None) -> Backend:
    """The backend called ``name`` (its flags checked already: :func:`check_backend`)."""
    if name == "local":
        return LocalBackend()
    if name == "ray":
        try:
            from attn_search.backends.ray_tune import RayBackend
        except ImportError as exc:
            raise UsageError(f"--backend ray needs Ray Tune ({exc}): pip install '.[ray]'") from exc
        return RayBackend(options or BackendOptions(), run_dir=run_dir, resume=resume)
    raise UsageError(f"--backend {name!r} is unknown: use one of {', '.join(BACKENDS)}")
