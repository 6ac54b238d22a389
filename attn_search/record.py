"""``attn-search record``: train every configuration of a discretised space, write a table.

The grid is the env's action grid (:func:`attn_search.envs.attention_search.grids_of`): every
categorical choice, ``bins`` values per numeric parameter (log-spaced where the space says so),
conditional parameters only where active, so no configuration appears twice. ``--grid
NAME=v1,v2`` replaces a parameter's values (one value pins it), which is how a few hundred
configurations are kept out of tens of thousands. Recording runs through the ordinary search
machinery (the configurations are enqueued into an Optuna study in a work dir, pruning off), so
it is resumable with ``--resume`` and uses the same backends and outputs; the table is that run's
``trials.csv`` with the command that produced it in a ``#`` header, plus a ``curve`` column: the
held-out accuracy at every rung (``step:accuracy`` pairs separated by ``;``), so that early stopping
can be replayed on the table and a stopped trial costs only the steps it ran.
"""

from __future__ import annotations

import dataclasses
import shlex
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from attn_search.engine.tasks import make_task
from attn_search.report.outputs import load_run
from attn_search.search.evaluators import format_curve, grids_of
from attn_search.search.loop import SearchOptions, run_search
from attn_search.search.plan import search_task
from attn_search.search.space import SearchSpace, load_space


def parse_grid(items: Sequence[str], space: SearchSpace) -> dict[str, list[Any]]:
    """``["lr=0.003,0.01", "dropout=0"]`` -> values per parameter, checked against the space."""
    params = {p.name: p for p in space.params}
    out: dict[str, list[Any]] = {}
    for item in items:
        name, sep, raw = item.partition("=")
        if not sep or name not in params:
            raise ValueError(f"--grid {item!r}: use NAME=v1,v2 with NAME one of {', '.join(params)}")
        values = [yaml.safe_load(v) for v in raw.split(",") if v.strip()]
        p = params[name]
        for v in values:
            ok = v in p.choices if p.kind == "categorical" else isinstance(v, int | float) and p.low <= v <= p.high  # type: ignore[operator]
            if not ok:
                allowed = list(p.choices) if p.kind == "categorical" else f"[{p.low}, {p.high}]"
                raise ValueError(f"--grid {item!r}: {v!r} is outside {name}'s range {allowed}")
        out[name] = values
    return out


def grid_configs(
    space: SearchSpace, *, bins: int, overrides: Mapping[str, list[Any]] | None = None
) -> list[dict[str, Any]]:
    """Every distinct active combination of the grid values, in a stable order."""
    grids = grids_of(space, bins)
    overrides = overrides or {}
    out: list[dict[str, Any]] = []

    def walk(i: int, chosen: dict[str, Any]) -> None:
        if i == len(space.params):
            out.append(dict(chosen))
            return
        p = space.params[i]
        if not p.active(chosen):
            walk(i + 1, chosen)
            return
        for value in overrides.get(p.name, grids[i]):
            chosen[p.name] = value
            walk(i + 1, chosen)
            del chosen[p.name]

    walk(0, {})
    return out


def record(
    space: str,
    out: str | Path,
    *,
    bins: int = 3,
    grid: Sequence[str] = (),
    preset: str = "smoke",
    steps: int | None = None,
    task: str | None = None,
    task_params: Mapping[str, Any] | None = None,
    seed: int = 0,
    device: str = "auto",
    target_len: int | None = None,
    resume: bool = False,
    quiet: bool = False,
    argv: Sequence[str] | None = None,
) -> Path:
    """Record the table (see module docstring); returns its path. Compute (``flops``,
    ``attn_flops``, ``attn_tile_flops``) is counted at ``target_len``, by default the task's length
    whatever the space's ``target_len`` (with the trial's own latency and memory, as without one):
    what the candidate policy's meta-training reads a table's compute as (it counts a deployment
    length itself, analytically; the grid agent's meta-training and the replays read the table's
    columns as recorded), and what the shipped tables hold, so the command in a shipped table's
    header records it again. The header says which length."""
    out = Path(out)
    loaded = load_space(space)
    configs = grid_configs(loaded, bins=bins, overrides=parse_grid(grid, loaded))
    work = out.with_name(out.name + ".run")
    opts = SearchOptions(
        space=space, strategy="random", trials=len(configs), preset=preset, steps=steps, seed=seed, device=device,
        task=task, task_params=dict(task_params or {}) or None, out=str(work), resume=resume, pruner="none", quiet=quiet, enqueue=configs,
        confirm=0,  # a table holds one training run per configuration, as a search's trial is
    )  # fmt: skip
    if target_len is None:
        family, params = search_task(loaded, opts)
        target_len = make_task(family, **params).seq_len
    opts = dataclasses.replace(opts, target_len=target_len)
    run_search(opts)
    command = "attn-search record " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[2:]))
    study, _, run = load_run(work)
    curves = {t.number: format_curve(t.user_attrs.get("curve", [])) for t in study.get_trials(deepcopy=False)}
    frame = pd.read_csv(work / "trials.csv")
    frame["curve"] = [curves.get(int(n), "") for n in frame["trial"]]
    header = (
        f"# attn_search recorded table: {len(configs)} configurations of space {loaded.name!r} on task "
        f"{run.task!r} {run.task_params} (bins={bins}, preset={preset}, steps={steps or 'preset'}, "
        f"seed={seed}, compute at L={target_len})\n# command: {command}\n"
    )
    out.write_text(header + frame.to_csv(index=False))
    return out
