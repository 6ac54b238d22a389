"""The first proposals of ``--strategy ppo``: a short list of configurations learned across task
families, then the meta-trained candidate policy.

The candidate policy (:mod:`~attn_search.strategies.candidates`) scores candidates from a
surrogate fitted on the search so far; with no trials yet it has nothing to fit, and on families it
never saw it spent its first proposals badly (``benchmarks/family_out.py``: behind the portfolio at
10 trials on MQAR and selective copy). A meta-learned initial design is the field's answer to that
cold start (Feurer et al., AAAI 2015; Wistuba et al., "Learning hyperparameter optimization
initializations", DSAA 2015): :func:`learn_head` picks, greedily, the configurations that together
cover the recorded tables' fronts best, one list with compute counted at the task's length, one
at the deployment length over kept entries and one there over 128-tiles (:func:`add_head`); a
search starts with the list of the length and measure its compute is counted at
(:func:`stored_head`). The policy sees their results like any other trial's.

The lists hold up to :data:`PORTFOLIO_SIZE`: ``--strategy portfolio`` proposes a whole one, then TPE
(the zero-shot portfolio of the family-out benchmark, learned from every shipped table).

The head is kept as configurations (:class:`~attn_search.engine.config.AttentionConfig` fields),
not as one space's values, so any space may use it: :class:`HeadFirst` proposes only those entries
the search's space can build exactly, and skips the rest.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from attn_search.engine import metrics as M
from attn_search.search.space import SearchSpace
from attn_search.strategies.base import FirstThese, Outcome, Strategy
from attn_search.strategies.candidates import TableTask, _hv

HEAD_SIZE = 5
"""Configurations proposed before the policy: as many as the ``portfolio+gp`` baseline's head
(:data:`attn_search.replay.PORTFOLIO_HEAD`), learned by the same greedy cover at the same length,
so the two recipes differ only in what follows. (One list learned over both lengths at once, as
before, was not the baseline's; the per-length lists moved the family-out counts toward the goal
with mixed effects elsewhere: ``benchmarks/results/family_out_variants.txt``, 11.)"""


PORTFOLIO_SIZE = 50
"""The most configurations a stored list holds (:func:`add_head`): a list ends sooner where it
covers every table's front, since the greedy cover adds nothing after that (the shipped tile list
after 9; the other two still gain at 50). ``--strategy portfolio`` proposes a whole list, then
TPE (the family-out benchmark's ``portfolio`` baseline goes on in table row order instead, up to
50); ``ppo`` and ``portfolio+gp`` take the first :data:`HEAD_SIZE`. The cover is greedy, so a
list's first ``k`` are the list of ``k`` (``tests/test_head.py``)."""


LENGTHS = ("task", "deploy", "tiles")
"""The heads :func:`add_head` learns: compute counted at the task's length (``task``); at the
deployment length as the whole model's FLOPs over kept entries (``deploy``, as meta-training counts
it); and there as the attention's FLOPs over 128-tiles (``tiles``: ``attn_tile_flops``, the
sparse space's objective, whose front differs: a stride touches every tile). ``tiles`` is what
``benchmarks/family_out.py --deploy-compute attn_tile_flops`` scores ``ppo`` with."""


def _config_key(config: Mapping[str, Any]) -> str:
    return json.dumps({k: v for k, v in config.items() if k != "seed"}, sort_keys=True)


def learn_head(
    tables: Sequence[TableTask],
    size: int = HEAD_SIZE,
    lengths: Sequence[str] = LENGTHS,
    *,
    until_covered: bool = False,
) -> list[dict[str, Any]]:
    """Up to ``size`` configurations (``AttentionConfig.to_dict()`` without the seed) chosen greedily
    to maximise the mean, over every table and each of ``lengths`` (``task``, ``deploy`` where the
    tables count it), of the front's hypervolume as a fraction of the table's best. Only
    configurations every table holds are candidates; ties keep the first table's row order. Once
    every table's front is covered no configuration adds anything: ``until_covered`` ends the list
    there, instead of filling it up in the first table's row order (which learns nothing)."""
    if not tables:
        raise ValueError("a head needs at least one table to learn from")
    lengths = [n for n in lengths if all(n in t.costs for t in tables)]
    if not lengths:
        raise ValueError("a head needs tables that count compute at the lengths it is learned for")
    index = [{k: i for i, k in enumerate(t.keys)} for t in tables]
    common = [k for k in tables[0].keys if all(k in ix for ix in index[1:])]
    points = []  # per (table, length): (accuracy, normalised cost) of every common key, and the best HV
    for t, ix in zip(tables, index, strict=True):
        rows = np.array([ix[k] for k in common])
        for n in lengths:
            pts = np.column_stack([t.accuracy[rows], t.normalised_cost(n)[rows]])
            points.append((pts, t.best_hv(n)))
    chosen: list[int] = []
    reached = 0.0
    while len(chosen) < min(size, len(common)):
        best, best_score = -1, -1.0
        for j in range(len(common)):
            if j in chosen:
                continue
            score = float(np.mean([_hv(pts[[*chosen, j]]) / hv for pts, hv in points]))
            if score > best_score + 1e-12:
                best, best_score = j, score
        if until_covered and best_score <= reached + 1e-12:
            break
        chosen.append(best)
        reached = best_score
    configs = dict(zip(tables[0].keys, tables[0].configs, strict=True))
    return [{k: v for k, v in configs[common[j]].to_dict().items() if k != "seed"} for j in chosen]


def add_head(
    agent: str | Path, tables: Sequence[str | Path], *, deploy_len: int | None = None
) -> dict[str, list[dict[str, Any]]]:
    """Learn a list of up to :data:`PORTFOLIO_SIZE` per length and measure (:data:`LENGTHS`: ``task``;
    ``deploy`` and ``tiles``, compute at ``deploy_len``, by default the length the policy was
    meta-trained at, over kept entries and over 128-tiles) from ``tables`` and store them in the
    saved policy's sidecar (``"heads"``), where ``--strategy portfolio`` finds them and ``ppo`` and
    ``portfolio+gp`` their first :data:`HEAD_SIZE`; the sidecar's other provenance stays as
    meta-training wrote it."""
    side = Path(agent).with_suffix(".json")
    info = json.loads(side.read_text())
    deploy_len = deploy_len or int(info.get("deploy_len", 4096))
    tasks = [TableTask(t, deploy_len=deploy_len) for t in tables]
    heads = {n: learn_head(tasks, PORTFOLIO_SIZE, lengths=(n,), until_covered=True) for n in ("task", "deploy")}
    tiles = [TableTask(t, deploy_len=deploy_len, deploy_metric=M.ATTN_TILE_FLOPS) for t in tables]
    heads["tiles"] = learn_head(tiles, PORTFOLIO_SIZE, lengths=("deploy",), until_covered=True)
    info.pop("head", None)  # (one list for both lengths, as sidecars before the per-length heads kept it)
    info["heads"] = heads
    info["head_tables"] = sorted(Path(t).stem for t in tables)
    side.write_text(json.dumps(info, indent=1) + "\n")
    return heads


def head_length(space: SearchSpace, task_len: int, deploy_len: int) -> str:
    """The head (:data:`LENGTHS`) a search of ``space`` on a task of length ``task_len`` starts
    with: where the space counts compute at a target length nearer (on a log scale) the heads'
    deployment length ``deploy_len`` than the task's, ``tiles`` if its compute is
    ``attn_tile_flops``, else ``deploy``; otherwise ``task``."""
    target = space.target_len
    if not target or target == task_len or abs(math.log(target / deploy_len)) >= abs(math.log(target / task_len)):
        return "task"
    return "tiles" if space.own_compute() == M.ATTN_TILE_FLOPS else "deploy"


def stored_head(
    info: Mapping[str, Any] | None, space: SearchSpace, task_len: int, size: int | None = HEAD_SIZE
) -> list[dict[str, Any]]:
    """The first ``size`` (``None``: all) configurations of the list a policy's sidecar holds for a
    search of ``space`` on a task of length ``task_len`` (:func:`head_length`); a sidecar written
    before the per-length heads holds one list for both."""
    if not info:
        return []
    heads = info.get("heads")
    if not heads:
        return list(info.get("head", []))[:size]
    length = head_length(space, task_len, int(info.get("deploy_len", 4096)))
    if length == "tiles" and "tiles" not in heads:  # (a sidecar from before the tile head)
        length = "deploy"
    return list(heads.get(length, []))[:size]


def head_values(space: SearchSpace, config: Mapping[str, Any]) -> dict[str, Any] | None:
    """The space's parameter values that build exactly ``config`` (an entry of a head), or ``None``
    when the space cannot: a parameter outside its range or choices, or a fixed field that differs."""
    values: dict[str, Any] = {}
    for p in space.params:
        if not p.active(values):
            continue
        if p.name not in config:
            return None
        v = config[p.name]
        if p.kind == "categorical":
            if v not in p.choices:
                return None
        elif v is None or not float(p.low) <= float(v) <= float(p.high):  # type: ignore[arg-type]
            return None
        values[p.name] = v
    try:
        built = space.make_config(values, seed=0).to_dict()
    except ValueError:
        return None
    return values if _config_key(built) == _config_key(config) else None


class HeadFirst(FirstThese):
    """A :class:`~attn_search.strategies.base.Strategy` that proposes the head's configurations the
    space can build, in order (``proposed_by``: ``label``, by default ``INNER-head``), then asks
    ``inner`` (``then`` says what it is); ``inner`` is told every trial, the head's too. ``name``:
    the strategy's (default: ``inner``'s)."""

    def __init__(self, inner: Strategy, head: Sequence[Mapping[str, Any]], space: SearchSpace, *,
                 name: str | None = None, then: str = "the policy", label: str | None = None) -> None:  # fmt: skip
        fits = [head_values(space, c) for c in head]
        super().__init__(inner, [v for v in fits if v is not None], name=name, label=label or f"{inner.name}-head")
        self.skipped = len(head) - len(self.queue)
        self.size = len(self.queue)
        self.then = then

    def start(self, history: Sequence[tuple[dict[str, Any], Outcome]]) -> str | None:
        line = super().start(history)
        # the head is a search's first proposals: a resumed search already past them (started with
        # another head, say before the tile head existed) does not go back to it midway
        self.queue = self.queue[: max(0, self.size - len(history))]
        note = f"  {self.name}: {len(self.queue)} learned first configurations, then {self.then}"
        if self.skipped:
            note += f" ({self.skipped} of the head are outside this space)"
        return f"{line}\n{note}" if line else note
