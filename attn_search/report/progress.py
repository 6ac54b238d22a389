"""What a search prints while it runs.

On a terminal: a status line rewritten in place (the running trials, their last rung and elapsed
time, refreshed every second) plus one line per finished trial. Elsewhere (logs, CI): plain lines
only, one per finished trial, and a line for a trial that has been running for a while without
one (every :data:`QUIET_S` seconds), so a log never shows minutes of silence. Nothing with
``quiet``. Thread-safe: backends report from their own threads.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any, TextIO

from attn_search.engine import metrics as M

QUIET_S = 30.0
"""Seconds without a line, in a log, after which the running trials are named."""


@dataclasses.dataclass
class _Running:
    label: str
    started: float
    rung: str = ""


class Progress:
    """The console side of a search (see the module docstring)."""

    def __init__(self, stream: TextIO, *, quiet: bool, total: int, compute_metric: str) -> None:
        self.stream = stream
        self.quiet = quiet
        self.total = total
        self.compute_metric = compute_metric
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self.t0 = time.perf_counter()
        self.running: dict[int, _Running] = {}
        self._lock = threading.RLock()
        self._last_line = time.perf_counter()
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    # -- output ----------------------------------------------------------------------------------
    def _print(self, text: str) -> None:
        if self.quiet:
            return
        with self._lock:
            if self.tty:
                self.stream.write("\r\x1b[K")
            self.stream.write(text + "\n")
            self.stream.flush()
            self._last_line = time.perf_counter()
            self._status()

    def _status(self) -> None:
        if self.quiet or not self.tty or not self.running:
            return
        now = time.perf_counter()
        parts = [
            f"trial {n} {r.label} {now - r.started:.0f}s{' ' + r.rung if r.rung else ''}"
            for n, r in self.running.items()
        ]
        self.stream.write("\r\x1b[K  running: " + " | ".join(parts)[:200])
        self.stream.flush()

    def _tick(self) -> None:
        while not self._stop.wait(1.0):
            with self._lock:
                if self.tty:
                    self._status()
                elif self.running and time.perf_counter() - self._last_line > QUIET_S:
                    now = time.perf_counter()
                    for n, r in self.running.items():
                        self._print(
                            f"  ... trial {n} {r.label} running for {now - r.started:.0f}s{', ' + r.rung if r.rung else ''}"
                        )

    def open(self) -> None:
        if not self.quiet and self._ticker is None:
            self._ticker = threading.Thread(target=self._tick, name="progress", daemon=True)
            self._ticker.start()

    def close(self) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join(timeout=5)
        if self.tty and not self.quiet:
            with self._lock:
                self.stream.write("\r\x1b[K")
                self.stream.flush()

    # -- events ----------------------------------------------------------------------------------
    def start(self, *, done: int, remaining: int, out: Any, recovered: int) -> None:
        msg = f"attn_search: {remaining} trial(s) to run ({done} of {self.total} done) -> {out}"
        if recovered:
            msg += f"; {recovered} interrupted trial(s) will run again"
        self._print(msg)

    def note(self, text: str) -> None:
        """A line of its own (retries, resumes)."""
        self._print(text)

    def trial_started(self, number: int, label: str) -> None:
        with self._lock:
            self.running[number] = _Running(label, time.perf_counter())
            self._status()

    def rung(self, number: int, step: int, accuracy: float) -> None:
        with self._lock:
            if number in self.running:
                self.running[number].rung = f"step {step} acc {accuracy:.3f}"
            self._status()

    def trial_done(self, number: int, state: str, metrics: dict[str, float], label: str, stats: dict[str, Any]) -> None:
        with self._lock:
            self.running.pop(number, None)
        acc = metrics.get(M.ACCURACY, float("nan"))
        compute = metrics.get(self.compute_metric, float("nan"))
        self._print(
            f"[{stats['finished']:>3}/{self.total}] trial {number:>3} {state:<8} acc={acc:.3f} "
            f"{self.compute_metric}={compute:.4g} {label} | done {stats['complete']} pruned {stats['pruned']} "
            f"failed {stats['failed']} | best acc {stats['best_accuracy']:.3f} front {stats['front_size']} "
            f"HV {stats['hypervolume']:.3f} | {time.perf_counter() - self.t0:.0f}s"
        )

    def finish(self, summary: Any) -> None:
        self._print(
            f"done{': ' + summary.stopped_by if summary.stopped_by else ''}: {summary.n_finished} trials "
            f"({summary.n_complete} complete, {summary.n_pruned} pruned, "
            f"{summary.n_failed} failed), Pareto front of {summary.front_size}, normalised hypervolume "
            f"{summary.hypervolume:.3f} (see report.html for its definition)"
        )
        self._print(
            f"wall {summary.wall_seconds:.1f}s, inside trials {summary.trial_seconds:.1f}s, framework overhead "
            f"{summary.wall_seconds - summary.trial_seconds:.1f}s ({100 * summary.overhead_fraction:.1f}%)"
        )
        self._print(
            f"outputs in {summary.run_dir}: trials.csv pareto.csv best_config.yaml report.html (attn-search report/export)"
        )
