"""A recorded table with holes, standing in for training in the contract test.

``make(space)`` looks configurations up in ``tables/sparse-smoke.csv`` after :data:`DELAY`
seconds (so a search can be killed in the middle of a trial), except for the non-dense rows with
``lr == 0.006``: those lookups raise, as a trial that crashes would. Where the environment names a
marker file in ``CONTRACT_CRASH_ONCE``, the first lookup of the run (across a kill and its resume)
raises too, so every search has a crashed trial whatever its strategy proposes (a proposer that stays
at ``lr == 0.003`` never meets a hole). Ray's workers have the cluster's environment, not the
search's: there ``CONTRACT_CRASH_POINTER`` names a file that holds the current test's marker path
(the Ray tests share one cluster and run one at a time). Plugged in as
``--evaluator tests.contract_eval:make``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from attn_search.engine.config import AttentionConfig
from attn_search.search.evaluators import TableEvaluator, table_key
from attn_search.search.space import SearchSpace

TABLE = Path(__file__).resolve().parent.parent / "tables" / "sparse-smoke.csv"
DELAY = 0.15


class HoledTable(TableEvaluator):
    def __init__(self, path: Path, space: SearchSpace) -> None:
        super().__init__(path, space)
        holes = self.frame[(self.frame["pattern"] != "dense") & (self.frame["lr"] == 0.006)]
        for _, row in holes.iterrows():
            values = {p.name: row[p.name] for p in space.params if p.name in row and row[p.name] == row[p.name]}
            self.rows.pop(table_key(space, values), None)

    def __call__(self, config: AttentionConfig, values: Mapping[str, Any]) -> dict[str, float] | None:
        time.sleep(DELAY)
        marker = crash_marker()
        if marker:
            try:  # O_EXCL: one lookup of the run creates the marker, and only that one raises
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                pass
            else:
                raise KeyError(f"{TABLE.name} has no row for {dict(values)} (the contract's crashing trial)")
        return super().__call__(config, values)


def crash_marker() -> str | None:
    """The marker file whose creation makes this run's first lookup raise, or None."""
    marker = os.environ.get("CONTRACT_CRASH_ONCE")
    pointer = os.environ.get("CONTRACT_CRASH_POINTER")
    if not marker and pointer and os.path.exists(pointer):
        marker = Path(pointer).read_text().strip()
    return marker or None


def make(space: SearchSpace) -> HoledTable:
    return HoledTable(TABLE, space)
