"""Does the pick hold? Retrain a finished run's front with more seeds, or at a larger scale.

Every accuracy of a search is one training run of a small model, and these models often learn in
a sudden jump, so one seed can land either side of it. Two checks, both on a finished run dir,
both appending each retrain to a file as it finishes (a killed check loses nothing; running it
again skips what is done) and rewriting the run's outputs at the end:

* **seeds** (``--confirm K`` on a search, ``attn-search confirm RUN --seeds K``): each front point
  is trained again with ``K`` more seeds (``confirm.csv``). Its accuracy becomes the mean over
  every seed, with the standard deviation beside it
  (:func:`~attn_search.report.outputs.with_confirmations`), so the front, the hypervolume and the
  selection use the mean. A point whose mean drops can leave the front and let an unconfirmed
  trial in: rounds repeat (at most :data:`MAX_ROUNDS`) until every front point is confirmed.
* **scale** (``attn-search confirm RUN --seq-len L [--d-model D] [--n-layers N] [--steps S]``):
  the front (or its ``--top K`` most accurate points) is trained at the larger scale
  (``scale.csv``), and the report gives each point's accuracy at both scales and Kendall's tau
  between the two rankings (``scale.json``), with a warning when tau is below
  :data:`WEAK_TAU`: then the proxy does not rank configurations as the target scale does.
  Pattern parameters are absolute (a window of 46 stays 46 at the larger length).

Both run in this process, on ``--device`` (where the search ran on Ray, the driver's device).
On CUDA the seeds of one configuration train together as one population
(:func:`~attn_search.engine.trainer.evaluate_many`); on the CPU one after another, which is
faster there (see ``DEFAULT_POPULATION`` in :mod:`attn_search.search.loop`).
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from attn_search.engine import metrics as M
from attn_search.engine.config import AttentionConfig
from attn_search.engine.trainer import Budget, TrialResult, evaluate, evaluate_many, resolve_device
from attn_search.report.outputs import (
    CONFIRM_COLUMNS,
    CONFIRM_FILE,
    SCALE_FILE,
    RunOutputs,
    front_rows,
    load_run,
    row_config,
)

MAX_ROUNDS = 3
"""Rounds of seed confirmation: a round retrains the front points not yet confirmed."""
WEAK_TAU = 0.5
"""Kendall's tau between proxy and scale accuracies below which the scale check warns."""
SCALE_COLUMNS = ["trial", "seq_len", "d_model", "n_layers", "steps", "state", M.ACCURACY, "accuracy_proxy", "seconds"]


def _append(path: Path, columns: Sequence[str], row: dict[str, Any]) -> None:
    """One finished retrain, on disk before the next starts (a kill loses at most the one running)."""
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns))
        if new:
            writer.writeheader()
        writer.writerow(row)
        f.flush()
        os.fsync(f.fileno())


def retrain(configs: list[AttentionConfig], task: str, budget: Budget, device: str, task_kwargs: dict[str, Any],
            *, together: bool | None = None) -> list[TrialResult]:  # fmt: skip
    """Train ``configs`` (seeds of one configuration): as one population where ``together`` (default:
    on CUDA, where a population costs about what one trial does), else one after another."""
    if together is None:
        together = resolve_device(device).type == "cuda"
    if together and len(configs) > 1:
        return evaluate_many(configs, task, budget=budget, device=device, task_kwargs=task_kwargs)
    return [evaluate(c, task, budget=budget, device=device, task_kwargs=task_kwargs) for c in configs]


def extra_seeds(seed: int, k: int) -> list[int]:
    """The ``k`` seeds a trial trained with ``seed`` is confirmed with."""
    return [seed + 1 + j for j in range(k)]


def confirm_seeds(
    run_dir: str | Path, *, seeds: int, device: str = "auto", say: Callable[[str], None] = print
) -> pd.DataFrame:
    """Retrain each front point of ``run_dir`` with ``seeds`` more seeds (see the module
    docstring); returns the front as the rewritten ``pareto.csv`` holds it."""
    if seeds < 1:
        raise ValueError(f"--seeds {seeds} is invalid: confirm with at least 1 more seed")
    run_dir = Path(run_dir)
    study, space, record = load_run(run_dir)
    outputs = RunOutputs.from_record(run_dir, record, space)
    budget = record.budget_for()
    path = run_dir / CONFIRM_FILE
    done: set[tuple[int, int]] = set()
    if path.is_file():
        done = {(int(t), int(s)) for t, s in pd.read_csv(path)[["trial", "seed"]].itertuples(index=False)}
    start = time.perf_counter()
    for _ in range(MAX_ROUNDS):
        front = front_rows(outputs.frame(study), space)
        todo = [(row, [s for s in extra_seeds(int(row["seed"]), seeds) if (int(row["trial"]), s) not in done])
                for _, row in front.iterrows()]  # fmt: skip
        todo = [(row, s) for row, s in todo if s]
        if not todo:
            break
        say(f"confirming {len(todo)} front point(s) with {seeds} more seed(s) each "
            f"({sum(len(s) for _, s in todo)} trainings)")  # fmt: skip
        for row, new in todo:
            trial = int(row["trial"])
            configs = [row_config(row).replace(seed=s) for s in new]
            t0 = time.perf_counter()
            results = retrain(configs, outputs.task_name, budget, device, outputs.task_kwargs)
            seconds = (time.perf_counter() - t0) / len(configs)
            for s, r in zip(new, results, strict=True):
                _append(path, CONFIRM_COLUMNS, {"trial": trial, "seed": s, "state": r.state,
                        M.ACCURACY: r.metrics.get(M.ACCURACY, math.nan), M.STEPS: r.metrics.get(M.STEPS),
                        "seconds": round(seconds, 2)})  # fmt: skip
                done.add((trial, s))
            accs = ", ".join(f"{r.metrics.get(M.ACCURACY, math.nan):.3f}" for r in results)
            say(f"  trial {trial} ({configs[0].describe()}): search {row[M.ACCURACY]:.3f}, seeds {new}: {accs} "
                f"({time.perf_counter() - start:.0f} s)")  # fmt: skip
    outputs.write_all(study)
    return pd.read_csv(run_dir / "pareto.csv")


def kendall_tau(proxy: Sequence[float], scale: Sequence[float]) -> float:
    """Kendall's tau-b between two rankings (nan with fewer than two points or no variation)."""
    from scipy.stats import kendalltau

    if len(proxy) < 2:
        return math.nan
    return float(kendalltau(proxy, scale).statistic)


def confirm_scale(
    run_dir: str | Path,
    *,
    seq_len: int,
    d_model: int | None = None,
    n_layers: int | None = None,
    steps: int | None = None,
    top: int | None = None,
    device: str = "auto",
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Retrain the front of ``run_dir`` (or its ``top`` most accurate points) at ``seq_len`` (and
    ``d_model``, ``n_layers``, ``steps`` where given); returns what ``scale.json`` holds: the
    settings, each point's accuracy at both scales, Kendall's tau and whether it is weak."""
    for flag, value in (("--seq-len", seq_len), ("--d-model", d_model), ("--n-layers", n_layers),
                        ("--steps", steps), ("--top", top)):  # fmt: skip
        if value is not None and value < 1:
            raise ValueError(f"{flag} {value} is invalid: it must be at least 1")
    run_dir = Path(run_dir)
    study, space, record = load_run(run_dir)
    outputs = RunOutputs.from_record(run_dir, record, space)
    budget = record.budget_for(**({"steps": steps} if steps else {}), target_len=None)
    task_kwargs = {**outputs.task_kwargs, "seq_len": seq_len}
    front = front_rows(outputs.frame(study), space)
    if top is not None:
        front = front.head(top)
    if front.empty:
        raise ValueError(f"{run_dir}: no complete trial on the front to check")
    changes = {k: v for k, v in (("d_model", d_model), ("n_layers", n_layers)) if v is not None}
    configs = {int(r["trial"]): row_config(r).replace(**changes) for _, r in front.iterrows()}  # checks heads | d_model
    from attn_search.engine.tasks import make_task

    try:
        make_task(outputs.task_name, **task_kwargs)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"--seq-len {seq_len}: task {outputs.task_name} cannot be built at it ({exc})") from exc
    key = {"seq_len": seq_len, "d_model": d_model or next(iter(configs.values())).d_model,
           "n_layers": n_layers or next(iter(configs.values())).n_layers, "steps": budget.steps}  # fmt: skip
    path = run_dir / SCALE_FILE
    done: dict[int, dict[str, Any]] = {}
    if path.is_file():
        old = pd.read_csv(path)
        same = old[(old[list(key)] == pd.Series(key)).all(axis=1)]
        done = {int(r["trial"]): r.to_dict() for _, r in same.iterrows()}
    todo = [t for t in configs if t not in done]
    say(f"scale check: {len(configs)} front point(s) at seq_len {seq_len}, d_model {key['d_model']}, n_layers "
        f"{key['n_layers']}, {budget.steps} steps ({len(configs) - len(todo)} already trained)")  # fmt: skip
    start = time.perf_counter()
    proxy = {int(r["trial"]): float(r[M.ACCURACY]) for _, r in front.iterrows()}
    for trial in todo:
        t0 = time.perf_counter()
        (result,) = retrain([configs[trial]], outputs.task_name, budget, device, task_kwargs)
        row = {"trial": trial, **key, "state": result.state, M.ACCURACY: result.metrics.get(M.ACCURACY, math.nan),
               "accuracy_proxy": proxy[trial], "seconds": round(time.perf_counter() - t0, 2)}  # fmt: skip
        _append(path, SCALE_COLUMNS, row)
        done[trial] = row
        say(f"  trial {trial} ({configs[trial].describe()}): proxy {proxy[trial]:.3f}, at scale "
            f"{row[M.ACCURACY]:.3f} ({time.perf_counter() - start:.0f} s)")  # fmt: skip
    points: list[dict[str, Any]] = [
        {"trial": t, "accuracy_proxy": proxy[t], "accuracy_scale": float(done[t][M.ACCURACY]),
         "config": configs[t].describe()} for t in configs if done[t]["state"] == M.COMPLETE
    ]  # fmt: skip
    tau = kendall_tau([float(p["accuracy_proxy"]) for p in points], [float(p["accuracy_scale"]) for p in points])
    summary: dict[str, Any] = {**key, "task": outputs.task_name, "task_params": task_kwargs, "points": points, "kendall_tau": tau,
              "weak": bool(not np.isfinite(tau) or tau < WEAK_TAU), "weak_below": WEAK_TAU}  # fmt: skip
    (run_dir / SCALE_FILE).with_suffix(".json").write_text(json.dumps(summary, indent=2))
    if summary["weak"]:
        say(f"warning: the proxy's ranking does not hold at seq_len {seq_len}: Kendall's tau {tau:.2f} < {WEAK_TAU} "
            "(see report.html, 'Scale check')")  # fmt: skip
    else:
        say(f"Kendall's tau between proxy and scale accuracies: {tau:.2f} over {len(points)} points")
    outputs.write_all(study)
    return summary
