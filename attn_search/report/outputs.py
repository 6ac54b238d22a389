"""Everything a run writes into its run dir, rebuilt from the Optuna study alone.

``trials.csv`` (every trial: config, metrics, state, duration, device), ``pareto.csv`` (the
non-dominated complete trials), ``best_config.yaml`` (the front point chosen by ``--select``),
``pareto.png``, ``hypervolume.png``, ``pareto.html`` (interactive) and ``report.html``.
``attn-search report RUN_DIR`` calls :func:`rebuild` to write them again.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
import yaml

from attn_search.engine import metrics as M
from attn_search.engine.config import AttentionConfig, as_dense, simplest_equivalent, unused_pattern_fields
from attn_search.search.pareto import knee_point, normalized_hypervolume, pareto_front
from attn_search.search.rundir import RUN_FILE, RunRecord
from attn_search.search.space import SearchSpace, parse_space

METRIC_COLUMNS = [M.ACCURACY, M.FLOPS, M.ATTN_FLOPS, M.ATTN_TILE_FLOPS, M.PARAMS, M.LATENCY_MS, M.PEAK_MEM_MB, M.TRAIN_SECONDS, M.EVAL_SECONDS,
                  M.WALL_SECONDS, M.STEPS, M.FINAL_LOSS, M.LATENCY_SPREAD]  # fmt: skip
CONFIG_COLUMNS = [f.name for f in dataclasses.fields(AttentionConfig)]
SELECTIONS = ("knee", "max-accuracy", "min-compute")
TRIAL_COLUMNS = ["trial", "state", "completed", "reason", "duration_s", "device", "node", "slot", *METRIC_COLUMNS,
                 *CONFIG_COLUMNS, "feasible"]  # fmt: skip
"""The columns of ``trials.csv``, whichever backend ran the trials. ``slot``: the first trial of the
population the trial trained in (``--population``; its own number when it trained alone)."""


KNEE_MIN_ACCURACY = 0.95
"""``knee`` chooses among front points with at least this fraction of the best accuracy: the
knee of a front whose compute axis spans little would otherwise give up large accuracy for small
savings (a window at 0.67 chosen over BigBird at 0.91-1.00 for 14-20% more FLOPs)."""


def parse_selection(rule: str) -> tuple[str, str | None, float | None]:
    """``knee`` (``knee=F``: accuracy floor F of the best, default :data:`KNEE_MIN_ACCURACY`),
    ``max-accuracy``, ``min-compute`` or ``max-accuracy-under-<flops|attn_flops|attn_tile_flops|latency|memory|params>=N``."""
    if rule in SELECTIONS:
        return rule, None, KNEE_MIN_ACCURACY if rule == "knee" else None
    if rule.startswith("knee="):
        try:
            floor = float(rule[len("knee=") :])
        except ValueError:
            floor = -1.0
        if 0 <= floor <= 1:
            return "knee", None, floor
    prefix = "max-accuracy-under-"
    if rule.startswith(prefix) and "=" in rule:
        name, _, value = rule[len(prefix) :].partition("=")
        if name in M.COMPUTE_OBJECTIVES:
            try:
                return "under", M.COMPUTE_OBJECTIVES[name], float(value)
            except ValueError:
                pass
    raise ValueError(
        f"--select {rule!r} is unknown: use knee (or knee=F, F in [0, 1]), max-accuracy, min-compute or "
        "max-accuracy-under-flops=N (also -attn_flops=, -attn_tile_flops=, -latency=, -memory=, -params=)"
    )


def describe_selection(rule: str) -> str:
    """One sentence saying what ``rule`` chooses (for the report)."""
    kind, metric, limit = parse_selection(rule)
    if kind == "knee":
        return (
            f"the knee of the front (the point farthest from the line joining its extremes, both axes "
            f"normalised over the front) among points with at least {limit:.0%} of the best accuracy"
        )
    if kind == "under":
        return f"the most accurate complete trial with {metric} at most {limit:g}"
    return {"max-accuracy": "the most accurate front point", "min-compute": "the cheapest front point"}[kind]


def _state(t: optuna.trial.FrozenTrial) -> str:
    if t.user_attrs.get("interrupted"):
        return "interrupted"
    return {
        optuna.trial.TrialState.COMPLETE: M.COMPLETE,
        optuna.trial.TrialState.PRUNED: M.PRUNED,
        optuna.trial.TrialState.FAIL: M.FAILED,
    }.get(t.state, t.state.name.lower())


def trials_frame(study: optuna.Study) -> pd.DataFrame:
    """One row per trial: number, state, reason, duration, device, metrics, config fields."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        if "duplicate_of" in t.user_attrs:
            continue  # a proposal that repeated an earlier trial: never ran (see SearchLoop._next)
        metrics = t.user_attrs.get("metrics", {})
        config = t.user_attrs.get("config", {})
        duration = (
            (t.datetime_complete - t.datetime_start).total_seconds()
            if t.datetime_complete and t.datetime_start
            else math.nan
        )
        row: dict[str, Any] = {
            "trial": t.number,
            "state": _state(t),
            "completed": t.datetime_complete.isoformat(timespec="milliseconds") if t.datetime_complete else "",
            "reason": t.user_attrs.get("reason", ""),
            "duration_s": duration,
            "device": t.user_attrs.get("device", ""),
            "node": t.user_attrs.get("node", ""),
            "slot": t.user_attrs.get("slot", t.number),
        }
        row.update({m: metrics.get(m, math.nan) for m in METRIC_COLUMNS})
        row.update({c: config.get(c, t.params.get(c)) for c in CONFIG_COLUMNS})
        row.update({c: None for c in unused_pattern_fields(str(row["pattern"]))})  # what the pattern does not read
        row["feasible"] = all(c <= 0 for c in t.constraints.values())  # Optuna's Trial.set_constraint
        rows.append(row)
    return pd.DataFrame(rows, columns=TRIAL_COLUMNS)


CONFIRM_FILE = "confirm.csv"
"""A run's confirmation retrains (``--confirm K``, ``attn-search confirm``): one row per trial and
extra seed, appended as each finishes (:mod:`attn_search.confirm`)."""
CONFIRM_COLUMNS = ["trial", "seed", "state", M.ACCURACY, M.STEPS, "seconds"]
SCALE_FILE = "scale.csv"
"""A run's scale check (``attn-search confirm RUN --seq-len L``): one row per retrained front point;
its summary with Kendall's tau is ``scale.json``."""


def with_confirmations(df: pd.DataFrame, run_dir: Path) -> pd.DataFrame:
    """``df`` with each confirmed trial's accuracy replaced by its mean over every seed (the
    search's and the confirmation's, complete runs only), and the columns ``accuracy_search`` (the
    search's own run), ``accuracy_sd`` (standard deviation over seeds) and ``seeds``; unchanged
    when the run has no confirmations. The front, the hypervolume and the selection then use the
    mean."""
    path = run_dir / CONFIRM_FILE
    if not path.is_file():
        return df
    extra = pd.read_csv(path)
    extra = extra[extra["state"] == M.COMPLETE]
    if extra.empty:
        return df
    out = df.copy()
    out["accuracy_search"] = out[M.ACCURACY]
    out["accuracy_sd"] = math.nan
    out["seeds"] = (out["state"] == M.COMPLETE).astype(int)
    for trial, rows in extra.groupby("trial"):
        at = out.index[(out["trial"] == trial) & (out["state"] == M.COMPLETE)]
        if len(at) == 0:
            continue
        values = np.concatenate([[out.at[at[0], M.ACCURACY]], rows[M.ACCURACY].to_numpy(dtype=float)])
        out.loc[at[0], [M.ACCURACY, "accuracy_sd", "seeds"]] = [values.mean(), values.std(ddof=1), len(values)]
    return out


def mark_noise(front: pd.DataFrame) -> pd.DataFrame:
    """The front (best accuracy first) with ``within_noise_of``: the next front point (in accuracy
    order) whose mean accuracy differs from this one's by less than the larger of their standard
    deviations over seeds, so their order is not settled; empty where the gap is larger, or where
    either point has one seed only."""
    if "accuracy_sd" not in front.columns or front.empty:
        return front
    front = front.copy()
    marks = [""] * len(front)
    acc, sd, trial = front[M.ACCURACY].to_numpy(), front["accuracy_sd"].to_numpy(), front["trial"].to_numpy()
    for i in range(len(front) - 1):
        if math.isnan(sd[i]) or math.isnan(sd[i + 1]):
            continue
        if abs(acc[i] - acc[i + 1]) < max(sd[i], sd[i + 1]):
            marks[i] = f"trial {int(trial[i + 1])}"
    front["within_noise_of"] = marks
    return front


def front_rows(df: pd.DataFrame, space: SearchSpace) -> pd.DataFrame:
    """Complete, feasible, non-dominated trials, best accuracy first."""
    ok = df[(df["state"] == M.COMPLETE) & df["feasible"]].dropna(subset=space.metrics)
    if ok.empty:
        return ok
    idx = pareto_front(ok[space.metrics].to_numpy(), space.directions)
    front = ok.iloc[idx]
    return front.sort_values(M.ACCURACY, ascending=False)


Bounds = dict[str, "tuple[float, float] | None"]
"""Normalisation range of each compute metric over the search space, fixed for the whole run; ``None``
for a measured metric (latency, memory) whose range cannot be known before trials measure it."""

HYPERVOLUME_DEFINITION = (
    "Normalised hypervolume: the fraction of the unit box dominated by the complete, feasible trials, "
    "with accuracy taken as is (in [0, 1]) and each compute metric scaled to [0, 1] by a range fixed for "
    "the run: for FLOPs and parameters the range over the whole search space (analytic; for a recorded "
    "table, the table's range), for measured latency and memory from 0 to the largest value seen so far. "
    "The reference point is accuracy 0 at the top of the compute range. A new trial can only raise it."
)


def _complete(df: pd.DataFrame, space: SearchSpace) -> pd.DataFrame:
    return df[(df["state"] == M.COMPLETE) & df["feasible"]].dropna(subset=space.metrics)


def hypervolume_of(df: pd.DataFrame, space: SearchSpace, bounds: Bounds | None = None) -> float:
    """Normalised hypervolume of the trials in ``df`` (see :data:`HYPERVOLUME_DEFINITION`): the one
    definition the console, the report and the RL environment use."""
    ok = _complete(df, space)
    if ok.empty:
        return 0.0
    return hypervolume_of_points(ok[space.metrics].to_numpy(), space, bounds)


def hypervolume_of_points(points: np.ndarray, space: SearchSpace, bounds: Bounds | None = None) -> float:
    """:func:`hypervolume_of` for the objective vectors of complete trials (``space.metrics`` order)."""
    points = np.asarray(points, dtype=float)
    if points.size == 0:
        return 0.0
    bounds = bounds or {}
    lower, upper = [], []
    for i, m in enumerate(space.metrics):
        if m == M.ACCURACY:
            lo, hi = 0.0, 1.0
        else:
            fixed = bounds.get(m)
            lo, hi = fixed if fixed is not None else (0.0, float(points[:, i].max()))
            # a point outside a fixed range (a custom evaluator, a rounding) counts at the range's edge
        lower.append(lo)
        upper.append(hi)
    return normalized_hypervolume(points, space.directions, lower=lower, upper=upper)


def select_row(df: pd.DataFrame, space: SearchSpace, rule: str) -> pd.Series | None:
    """The front row ``rule`` picks (see :func:`parse_selection`); ``None`` if nothing qualifies."""
    kind, metric, limit = parse_selection(rule)
    front = front_rows(df, space)
    if front.empty:
        return None
    compute = space.metrics[1] if len(space.metrics) > 1 else M.FLOPS
    if kind == "max-accuracy":
        return front.sort_values([M.ACCURACY, compute], ascending=[False, True]).iloc[0]
    if kind == "min-compute":
        return front.sort_values([compute, M.ACCURACY], ascending=[True, False]).iloc[0]
    if kind == "under":
        assert metric is not None and limit is not None
        ok = df[(df["state"] == M.COMPLETE) & df["feasible"] & (df[metric] <= limit)].dropna(subset=[M.ACCURACY])
        if ok.empty:
            return None
        return ok.sort_values([M.ACCURACY, metric], ascending=[False, True]).iloc[0]
    if len(space.metrics) == 1:
        return front.iloc[0]
    assert limit is not None
    near_best = front[front[M.ACCURACY] >= limit * front[M.ACCURACY].max()]
    pos = knee_point(near_best[space.metrics].to_numpy(), space.directions)
    return near_best.iloc[pos]


def _atomic_write(path: Path, text: str | bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    if isinstance(text, bytes):
        tmp.write_bytes(text)
    else:
        tmp.write_text(text)
    os.replace(tmp, path)


@dataclasses.dataclass
class SearchSummary:
    """What a finished search reports."""

    run_dir: Path
    n_finished: int
    n_complete: int
    n_pruned: int
    n_failed: int
    front_size: int
    hypervolume: float
    wall_seconds: float
    trial_seconds: float
    stopped_by: str = ""
    """Why the search ended, for the console (``--trials reached``, the time budget, ...)."""

    @property
    def overhead_fraction(self) -> float:
        """Share of wall time spent outside training and evaluation (sampler, storage, outputs)."""
        return max(0.0, self.wall_seconds - self.trial_seconds) / self.wall_seconds if self.wall_seconds else 0.0


@dataclasses.dataclass
class RunOutputs:
    """Writes a run dir's files from the study: the search loop's listener for finished trials and
    for the end of the search, and what ``attn-search report`` rebuilds from."""

    run_dir: Path
    space: SearchSpace
    select: str = "knee"
    constrained: bool = False
    task: str | None = None
    """The task actually searched (``--task`` or the space's); ``None``: the space's."""
    task_params: dict[str, Any] = dataclasses.field(default_factory=dict)
    bounds: Bounds = dataclasses.field(default_factory=dict)
    """Fixed compute ranges of the hypervolume (see :data:`HYPERVOLUME_DEFINITION`)."""

    @classmethod
    def from_record(cls, run_dir: Path, record: RunRecord, space: SearchSpace, *,
                    select: str | None = None) -> RunOutputs:  # fmt: skip
        """The outputs of a run dir, as its record (``run.json``) describes them."""
        bounds = {m: (tuple(b) if b is not None else None) for m, b in record.hypervolume_bounds.items()}
        return cls(run_dir, space=space, select=select or record.select, constrained=record.constrained,
                   task=record.task, task_params=dict(record.task_params), bounds=bounds)  # type: ignore[arg-type]  # fmt: skip

    @property
    def task_name(self) -> str:
        return self.task or self.space.task

    @property
    def task_kwargs(self) -> dict[str, Any]:
        return dict(self.task_params) if self.task is not None else dict(self.space.task_params)

    def task_len(self) -> int | None:
        """The searched task's sequence length (``None`` where the task cannot be built here)."""
        return self._task_dims()[0]

    def _task_dims(self) -> tuple[int | None, int | None]:
        """(sequence length, classes) of the searched task, or ``None``s where it cannot be built here."""
        if not hasattr(self, "_dims"):
            from attn_search.engine.tasks import make_task

            try:
                task = make_task(self.task_name, **self.task_kwargs)
                self._dims: tuple[int | None, int | None] = (int(task.seq_len), int(task.n_classes))
            except Exception:  # a user's task module that is not importable here: no picture, no failure
                self._dims = (None, None)
        return self._dims

    def dense_share(self, config: AttentionConfig, value: float, metric: str = M.FLOPS) -> tuple[float, int] | None:
        """``value`` of ``metric`` (an analytic one: ``flops``, ``attn_flops``, ``attn_tile_flops``) as a fraction of dense attention's
        (``config`` with the dense pattern) at the length compute is counted (the target length,
        else the task's), and that length."""
        from attn_search.engine.cost import analytic_compute

        task_len, n_classes = self._task_dims()
        length = self.space.target_len or task_len
        if length is None or n_classes is None:
            return None
        dense = analytic_compute(metric, as_dense(config), seq_len=length, n_classes=n_classes)
        return float(value) / dense, length

    def equivalent(self, config: AttentionConfig) -> str | None:
        """``"dense: ... keeps every entry at L=256"`` where ``config``'s pattern computes dense
        attention at the lengths that count (the task's and the target length), else ``None``."""
        lengths = [L for L in (self.task_len(), self.space.target_len) if L]
        found = simplest_equivalent(config, lengths)
        return None if found is None else found[1]

    def unmeasured_at_target(self, config: AttentionConfig, trial: int | None = None) -> str | None:
        """Where ``config``'s accuracy says little about the length compute is counted at: its mask
        keeps every entry at the task's length (it trained as dense attention) but not at the target
        length (BigBird(32, 4, 3): dense at L=256, 13% of dense's entries at L=4096); else ``None``.
        Once ``confirm --seq-len`` has retrained ``trial`` at the target length, says what it measured."""
        from attn_search.engine.patterns import keeps_everything, pattern_entries

        task_len, target = self.task_len(), self.space.target_len
        if not task_len or not target or target == task_len or config.pattern == "dense":
            return None
        pattern, causal, params = config.pattern, config.causal, config.pattern_params()
        if not keeps_everything(pattern, task_len, causal=causal, **params) or keeps_everything(
            pattern, target, causal=causal, **params
        ):
            return None
        share = pattern_entries(pattern, target, causal=causal, **params) / pattern_entries(
            "dense", target, causal=causal
        )
        said = (f"its accuracy was trained at L={task_len}, where {config.describe()} keeps every entry as dense "
                f"attention does; at L={target}, where compute is counted, it keeps {100 * share:.0f}% of dense's "
                "entries")  # fmt: skip
        scale = self.run_dir / SCALE_FILE
        if trial is not None and scale.is_file():
            rows = pd.read_csv(scale)
            rows = rows[(rows["trial"] == trial) & (rows["seq_len"] == target) & (rows["d_model"] == config.d_model)
                        & (rows["n_layers"] == config.n_layers)]  # fmt: skip
            if not rows.empty:
                measured = float(rows[M.ACCURACY].iloc[-1])
                return f"{said}, and retrained there (confirm --seq-len {target}) it reached accuracy {measured:.3f}"
        return (f"{said}, and its accuracy there is not measured (attn-search confirm {self.run_dir} --seq-len "
                f"{target} retrains the front at that length)")  # fmt: skip

    def hypervolume(self, df: pd.DataFrame) -> float:
        return hypervolume_of(df, self.space, self.bounds)

    def stats(self, study: optuna.Study, df: pd.DataFrame | None = None) -> dict[str, Any]:
        """Counts, best accuracy, front size and hypervolume (``df``: the trials table, if built)."""
        df = self.frame(study) if df is None else df
        counted = df[df["state"] != "interrupted"]
        front = front_rows(df, self.space)
        return {
            "finished": int(counted["state"].isin([M.COMPLETE, M.PRUNED, M.FAILED]).sum()),
            "complete": int((df["state"] == M.COMPLETE).sum()),
            "pruned": int((df["state"] == M.PRUNED).sum()),
            "failed": int((df["state"] == M.FAILED).sum()),
            "best_accuracy": float(df.loc[df["state"] == M.COMPLETE, M.ACCURACY].max())
            if (df["state"] == M.COMPLETE).any()
            else float("nan"),
            "front_size": len(front),
            "hypervolume": self.hypervolume(df),
        }

    def frame(self, study: optuna.Study) -> pd.DataFrame:
        """The trials table, with the run's confirmations merged (:func:`with_confirmations`)."""
        return with_confirmations(trials_frame(study), self.run_dir)

    def write_tables(self, study: optuna.Study) -> pd.DataFrame:
        """``trials.csv`` and ``pareto.csv`` (rewritten atomically after every trial)."""
        df = self.frame(study)
        _atomic_write(self.run_dir / "trials.csv", df.to_csv(index=False))
        _atomic_write(self.run_dir / "pareto.csv", mark_noise(front_rows(df, self.space)).to_csv(index=False))
        return df

    def write_best(self, df: pd.DataFrame) -> pd.Series | None:
        row = select_row(df, self.space, self.select)
        path = self.run_dir / "best_config.yaml"
        if row is None:
            if path.exists():
                path.unlink()
            return None
        _atomic_write(path, export_text(row, self, self.select, fmt="yaml"))
        return row

    def summary(self, study: optuna.Study, *, wall_seconds: float, trial_seconds: float) -> SearchSummary:
        s = self.stats(study)
        return SearchSummary(
            run_dir=self.run_dir, n_finished=s["finished"], n_complete=s["complete"], n_pruned=s["pruned"],
            n_failed=s["failed"], front_size=s["front_size"], hypervolume=s["hypervolume"],
            wall_seconds=wall_seconds, trial_seconds=trial_seconds,
        )  # fmt: skip

    def write_all(self, study: optuna.Study, *, wall_seconds: float | None = None, trial_seconds: float | None = None,
                  options: Any = None) -> None:  # fmt: skip
        df = self.write_tables(study)
        best = self.write_best(df)
        timing_file = self.run_dir / "timing.json"
        timing = json.loads(timing_file.read_text()) if timing_file.exists() else {"sessions": []}
        if wall_seconds is not None:
            timing["sessions"].append({"wall_seconds": wall_seconds, "trial_seconds": trial_seconds})
            _atomic_write(timing_file, json.dumps(timing, indent=2))
        write_plots(self.run_dir, df, self.space, self.bounds, best=best, task_len=self.task_len())
        write_report(self.run_dir, study, df, self, best, timing)


def row_config(row: pd.Series) -> AttentionConfig:
    """The config of a trials-table row (blank pattern parameters take their defaults)."""
    return AttentionConfig.from_dict({c: _plain(row[c]) for c in CONFIG_COLUMNS if not pd.isna(row[c])})


def export_dict(row: pd.Series, outputs: RunOutputs, select: str) -> dict[str, Any]:
    """The chosen trial as exported: its config (only the parameters its pattern uses), metrics and
    provenance, with the task actually searched."""
    config = row_config(row)
    same = outputs.equivalent(config)
    unmeasured = outputs.unmeasured_at_target(config, int(row["trial"]))
    return {
        "config": config.to_dict(),
        **({"equivalent": same} if same else {}),
        **({"caveat": unmeasured[0].upper() + unmeasured[1:]} if unmeasured else {}),
        "metrics": {
            m: _plain(row[m]) for m in [*METRIC_COLUMNS, "accuracy_sd", "seeds"] if m in row and not pd.isna(row[m])
        },
        "trial": int(row["trial"]),
        "selected_by": select,
        "space": outputs.space.name,
        "task": outputs.task_name,
        "task_params": outputs.task_kwargs,
        **({"target_len": outputs.space.target_len} if outputs.space.target_len is not None else {}),
    }


def export_text(row: pd.Series, outputs: RunOutputs, select: str, *, fmt: str) -> str:
    data = export_dict(row, outputs, select)
    if fmt == "json":
        return json.dumps(data, indent=2) + "\n"
    header = f"# attn_search: trial {data['trial']} selected by --select {select} from space {outputs.space.name!r}\n"
    if outputs.space.target_len is not None:
        header += (f"# metrics: compute at sequence length {outputs.space.target_len} (target_len), accuracy at the "
                   "task's; pattern parameters are absolute (a window stays the same width at any length)\n")  # fmt: skip
    return header + yaml.safe_dump(data, sort_keys=False)


def _plain(value: Any) -> Any:
    """numpy scalars (from pandas rows) as plain Python values, for YAML/JSON and configs."""
    return value.item() if isinstance(value, np.generic) else value


def _pattern_colors(patterns: Sequence[str]) -> dict[str, Any]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    return {p: cmap(i % 10) for i, p in enumerate(sorted(set(patterns)))}


def _spans_decade(values: pd.Series) -> bool:
    """Whether positive ``values`` span more than 10x (the front plot then uses a log axis)."""
    v = pd.to_numeric(values, errors="coerce").dropna()
    v = v[v > 0]
    return bool(len(v) > 1 and v.max() > 10 * v.min())


def write_plots(run_dir: Path, df: pd.DataFrame, space: SearchSpace, bounds: Bounds | None = None,
                best: pd.Series | None = None, task_len: int | None = None) -> None:  # fmt: skip
    """``pareto.png`` (the chosen point ``best`` starred), ``hypervolume.png``, the interactive
    ``pareto.html`` and ``pattern.png`` (the chosen pattern's mask at ``task_len`` and at the space's
    target length)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    compute = space.metrics[1] if len(space.metrics) > 1 else M.FLOPS
    done = df[df["state"] == M.COMPLETE]
    front = front_rows(df, space)
    colors = _pattern_colors(list(df["pattern"].dropna()))
    fig, ax = plt.subplots(figsize=(11, 5.5))
    pruned = df[df["state"] == M.PRUNED]
    if not pruned.empty:
        ax.scatter(pruned[compute], pruned[M.ACCURACY], marker="x", color="0.6", label="pruned (accuracy at stop)")
    for pattern, grp in done.groupby("pattern"):
        ax.scatter(grp[compute], grp[M.ACCURACY], color=colors[pattern], alpha=0.55, label=str(pattern))
    numbered: list[str] = []
    if not front.empty:
        f = front.sort_values(compute)
        ax.step(f[compute], f[M.ACCURACY], where="post", color="black", lw=1.2, label="Pareto front")
        ax.scatter(f[compute], f[M.ACCURACY], s=90, facecolors="none", edgecolors="black", lw=1.5)
        # Front points carry a number, and the key beside the axes says which configuration each is:
        # full labels collided wherever several points sat together.
        for i, (_, r) in enumerate(f.iterrows(), start=1):
            ax.annotate(str(i), (r[compute], r[M.ACCURACY]), textcoords="offset points", xytext=(5, 5), fontsize=7)
            numbered.append(f"{i}: {row_config(r).describe()} (trial {int(r['trial'])})")
    if best is not None:
        ax.scatter([best[compute]], [best[M.ACCURACY]], marker="*", s=260, color="crimson", edgecolors="black",
                   zorder=5, label="chosen (best_config.yaml)")  # fmt: skip
    at = f" at L={space.target_len}" if space.target_len else ""
    log_x = _spans_decade(done[compute])
    if log_x:  # past 10x (attention FLOPs at a deployment length): a linear axis crowds the cheap end
        ax.set_xscale("log")
    ax.set_xlabel(f"{compute}{at} (lower is better{', log scale' if log_x else ''})")
    ax.set_ylabel("held-out accuracy")
    ax.set_title(f"attn_search: {space.name} ({len(done)} complete trials)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # nothing to label before the first complete trial
        ax.legend(fontsize=7, loc="best")
    if numbered:
        shown = numbered if len(numbered) <= 30 else [*numbered[:29], f"... {len(numbered) - 29} more in pareto.csv"]
        fig.text(0.70, 0.93, "Pareto front\n" + "\n".join(shown), fontsize=6.5, va="top", family="monospace")
        fig.subplots_adjust(left=0.09, right=0.68, top=0.92, bottom=0.11)
    else:
        fig.tight_layout()
    fig.savefig(run_dir / "pareto.png", dpi=120)
    plt.close(fig)

    hv = hypervolume_history(df, space, bounds)
    fig, ax = plt.subplots(figsize=(7.5, 3.5))
    ax.plot(range(1, len(hv) + 1), hv, marker="o", ms=3)
    ax.set_xlabel("trials finished")
    ax.set_ylabel("normalised hypervolume")
    ax.set_ylim(0, max(1e-3, max(hv, default=0.0)) * 1.1)
    ax.grid(alpha=0.3)
    ax.set_title("front quality over the search")
    fig.tight_layout()
    fig.savefig(run_dir / "hypervolume.png", dpi=120)
    plt.close(fig)

    import plotly.graph_objects as go

    pfig = go.Figure()
    for pattern, grp in done.groupby("pattern"):
        text = [
            "<br>".join(f"{c}={_plain(r[c])}" for c in CONFIG_COLUMNS if not pd.isna(r[c])) + f"<br>trial {r['trial']}"
            for _, r in grp.iterrows()
        ]
        pfig.add_trace(
            go.Scatter(
                x=grp[compute], y=grp[M.ACCURACY], mode="markers", name=str(pattern), text=text, hoverinfo="text+x+y"
            )
        )
    if not front.empty:
        f = front.sort_values(compute)
        pfig.add_trace(
            go.Scatter(
                x=f[compute], y=f[M.ACCURACY], mode="lines", line={"shape": "hv", "color": "black"}, name="Pareto front"
            )
        )
    if best is not None:
        pfig.add_trace(go.Scatter(x=[best[compute]], y=[best[M.ACCURACY]], mode="markers", name="chosen",
                                  marker={"symbol": "star", "size": 16, "color": "crimson"},
                                  text=[row_config(best).describe()], hoverinfo="text+x+y"))  # fmt: skip
    pfig.update_layout(title=f"{space.name}: accuracy vs {compute}{at}", xaxis_title=f"{compute}{at}",
                       xaxis_type="log" if log_x else "linear", yaxis_title="accuracy")  # fmt: skip
    pfig.write_html(run_dir / "pareto.html", include_plotlyjs=True, full_html=True)
    if best is not None and task_len:
        write_pattern_picture(run_dir / "pattern.png", row_config(best), task_len, space.target_len)
    elif (run_dir / "pattern.png").exists():
        (run_dir / "pattern.png").unlink()


def write_pattern_picture(path: Path, config: AttentionConfig, task_len: int, target_len: int | None) -> None:
    """The chosen pattern's mask (which keys each query may attend) at the task's length, and at the
    target length where one is set (its first 512 queries and keys: a longer picture shows nothing)."""
    import matplotlib.pyplot as plt

    from attn_search.engine.patterns import pattern_density, pattern_mask

    lengths = [task_len] + ([target_len] if target_len and target_len != task_len else [])
    fig, axes = plt.subplots(1, len(lengths), figsize=(4.2 * len(lengths), 4.4), squeeze=False)
    params: dict[str, Any] = dict(config.pattern_params())
    for ax, L in zip(axes[0], lengths, strict=True):
        shown = min(L, 512)
        # the rule at L, cut to its first rows and columns (BigBird's blocks depend on L)
        mask = pattern_mask(config.pattern, L, causal=config.causal, **params)[:shown, :shown]
        density = pattern_density(config.pattern, L, causal=config.causal, **params)
        ax.imshow(mask.numpy(), cmap="Greys", interpolation="nearest")
        cut = "" if shown == L else f", first {shown}"
        ax.set_title(f"L={L}{cut}: keeps {100 * density:.1f}% of the L x L scores", fontsize=9)
        ax.set_xlabel("key")
        ax.set_ylabel("query")
    fig.suptitle(config.describe(), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def hypervolume_history(df: pd.DataFrame, space: SearchSpace, bounds: Bounds | None = None) -> list[float]:
    """Normalised hypervolume after each finished trial, in the order trials finished: what the
    console printed at each line (one definition, :data:`HYPERVOLUME_DEFINITION`)."""
    counted = df[df["state"] != "interrupted"]
    order = counted.sort_values(["completed", "trial"]) if "completed" in counted else counted.sort_values("trial")
    return [hypervolume_of(order.iloc[: i + 1], space, bounds) for i in range(len(order))]


def _attention_section(run_dir: Path, best: pd.Series | None) -> str:
    """The trained model's attention (``attention.png``, :mod:`attn_search.report.attention_map`), shown
    only while it is of the chosen trial."""
    sidecar = run_dir / "attention.json"
    if best is None or not sidecar.is_file() or not (run_dir / "attention.png").is_file():
        return ""
    if json.loads(sidecar.read_text()).get("trial") != int(best["trial"]):
        return "<p>(The attention picture in this run dir is of another trial: the selection changed since.)</p>"
    return (
        "<h3>What the trained model attends</h3><p>Its first layer's attention probabilities on one held-out "
        "example, per head (trained once more after the search).</p>" + _img(run_dir / "attention.png")
    )


def _img(path: Path) -> str:
    if not path.exists():
        return ""
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{path.name}" src="data:image/png;base64,{data}">'


def _table(df: pd.DataFrame, columns: list[str]) -> str:
    cols = [c for c in columns if c in df.columns]
    shown = df[cols].copy()
    for c in cols:
        if shown[c].dtype.kind == "f":
            shown[c] = shown[c].map(lambda v: "" if pd.isna(v) else f"{v:.4g}")
    return str(shown.to_html(index=False, escape=True, border=0, classes="t"))


MIN_TRIALS_FOR_IMPORTANCE = 20
"""Complete trials below which the report shows no importance table: with fewer, PED-ANOVA's
ranking mostly reflects which values the sampler happened to try (after 9 trials it ranked a
sparse space's window at 0.000 and weight decay at 0.334)."""


def importance_rows(study: optuna.Study, n_complete: int) -> str:
    """The report's importance table, with the number of trials behind it, or why there is none."""
    if n_complete < MIN_TRIALS_FOR_IMPORTANCE:
        return (f"<p>Not shown: {n_complete} complete trial(s), fewer than the {MIN_TRIALS_FOR_IMPORTANCE} an "
                "importance estimate needs to mean more than which values were tried.</p>")  # fmt: skip
    try:
        # PED-ANOVA (Optuna's default, no scikit-learn needed) explains *low* targets: negate accuracy.
        imp = optuna.importance.get_param_importances(study, target=lambda t: -t.values[0])
    except (RuntimeError, ValueError, ZeroDivisionError, ImportError) as exc:  # too uniform trials
        return f"<p>Not available: {html.escape(str(exc))}</p>"
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:.3f}</td></tr>" for k, v in imp.items())
    return f'<p>From {n_complete} complete trials.</p><table class="t">{rows}</table>'


def _other_task_note(outputs: RunOutputs) -> str:
    """A note when the run searched another task (or task parameters) than its space describes."""
    space = outputs.space
    if (outputs.task_name, outputs.task_kwargs) == (space.task, dict(space.task_params)):
        return ""
    return (
        f" (That describes the space's own task, {space.task} {json.dumps(dict(space.task_params))}; this run "
        "searched the task below.)"
    )


def write_report(run_dir: Path, study: optuna.Study, df: pd.DataFrame, outputs: RunOutputs, best: pd.Series | None,
                 timing: dict[str, Any]) -> None:  # fmt: skip
    """``report.html``: summary, the front, the plots, parameter importances, every trial."""
    space, select = outputs.space, outputs.select
    front = mark_noise(front_rows(df, space))
    compute = space.metrics[1] if len(space.metrics) > 1 else M.FLOPS
    counts = df["state"].value_counts().to_dict()
    wall = sum(s["wall_seconds"] for s in timing.get("sessions", []))
    inside = sum(s["trial_seconds"] or 0.0 for s in timing.get("sessions", []))
    importances = importance_rows(study, int((df["state"] == M.COMPLETE).sum()))
    best_html = "<p>No complete trial yet.</p>"
    if best is not None:
        cfg = row_config(best)
        best_html = (
            f"<p>Chosen by <code>--select {html.escape(select)}</code> ({html.escape(describe_selection(select))}): "
            f"trial {int(best['trial'])}, "
            f"<b>{html.escape(cfg.describe())}</b>, accuracy {best[M.ACCURACY]:.3f}{_spread(best)}, {compute} "
            f"{best[compute]:.4g}. "
            + (
                f"<b>It is {html.escape(same)}</b>: it runs as dense attention (SDPA). "
                if (same := outputs.equivalent(cfg))
                else ""
            )
            + _dense_note(outputs, cfg, best, front)
            + (
                f"<b>Caveat: {html.escape(unmeasured)}.</b> "
                if (unmeasured := outputs.unmeasured_at_target(cfg, int(best["trial"])))
                else ""
            )
            + "Written to <code>best_config.yaml</code>; <code>attn-search export RUN_DIR --format python</code> "
            "turns it into a torch module.</p>"
        )
    overhead = f"{wall - inside:.1f} s ({100 * (wall - inside) / wall:.1f}%)" if wall else "n/a"
    css = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
           "table.t{border-collapse:collapse;font-size:12px}table.t td,table.t th{padding:2px 6px;border-bottom:1px solid #ddd}"
           "img{max-width:100%}code{background:#f3f3f3;padding:1px 3px}")  # fmt: skip
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>attn_search report: {html.escape(space.name)}</title>
<style>{css}</style></head><body>
<h1>attn_search report: {html.escape(space.name)}</h1>
<p>{html.escape(space.description)}{html.escape(_other_task_note(outputs))}</p>
<p>Task searched: <code>{html.escape(outputs.task_name)}</code> {html.escape(json.dumps(outputs.task_kwargs))};
objectives {", ".join(f"{m} ({d})" for m, d in space.objectives)}.{html.escape(target_note(space))}
Trials: {", ".join(f"{v} {k}" for k, v in counts.items())}. Front: {len(front)} points; normalised hypervolume
{outputs.hypervolume(df):.3f}. Wall time {wall:.1f} s, of which inside training and evaluation {inside:.1f} s;
framework overhead {overhead}.{_latency_note(df)}</p>
<h2>Chosen configuration</h2>{best_html}{_img(run_dir / "pattern.png")}{_attention_section(run_dir, best)}
<h2>Accuracy versus {html.escape(compute)}</h2>{_img(run_dir / "pareto.png")}
<p><a href="pareto.html">Interactive plot</a> (hover a point for its configuration).</p>
<h2>Pareto front</h2>{_confirm_note(front)}{_table(front, ["trial", M.ACCURACY, "accuracy_sd", "seeds", "within_noise_of", "accuracy_search", M.FLOPS, M.ATTN_FLOPS, M.ATTN_TILE_FLOPS, M.LATENCY_MS, M.PEAK_MEM_MB, M.PARAMS, "pattern", "n_heads", "window", "dilation", "stride", "block_size", "n_global", "n_random", "lr", "dropout"])}
{_scale_section(run_dir)}
<h2>Hypervolume over the search</h2>{_img(run_dir / "hypervolume.png")}
<p>{html.escape(HYPERVOLUME_DEFINITION)} {html.escape(_bounds_text(space, outputs.bounds))}</p>
<h2>Parameter importances for accuracy (Optuna's PED-ANOVA)</h2>{importances}
<h2>All trials</h2>{_table(df, ["trial", "state", M.ACCURACY, compute, M.STEPS, "duration_s", "device", "pattern", "n_heads", "window", "lr", "reason"])}
</body></html>"""
    _atomic_write(run_dir / "report.html", page)


DENSE_SHARE_WANTED = 0.5
"""The default search should pick a configuration that costs at most this share of dense's
compute; the report says so where none within the selection's accuracy floor does."""


def _dense_note(outputs: RunOutputs, config: AttentionConfig, best: pd.Series, front: pd.DataFrame) -> str:
    """What the pick costs against dense attention at the length compute is counted ('' where the
    compute objective is not analytic FLOPs), and, where that is more than
    :data:`DENSE_SHARE_WANTED` under the knee rule, whether a front point within its accuracy floor
    costs less (the knee of two points is the more accurate one)."""
    compute = outputs.space.metrics[1] if len(outputs.space.metrics) > 1 else None
    if compute not in M.ANALYTIC or pd.isna(best.get(compute)):
        return ""
    share = outputs.dense_share(config, float(best[compute]), compute)
    if share is None:
        return ""
    fraction, length = share
    what = {M.ATTN_FLOPS: "attention FLOPs", M.ATTN_TILE_FLOPS: "attention FLOPs over 128-tiles"}.get(compute, "FLOPs")
    subject = "It" if compute == M.FLOPS else "Its attention"
    counted = "FLOPs over 128-tiles" if compute == M.ATTN_TILE_FLOPS else "FLOPs"
    note = f"{subject} costs {100 * fraction:.0f}% of dense attention's {counted} at L={length}. "
    kind, _, floor = parse_selection(outputs.select)
    if fraction <= DENSE_SHARE_WANTED or kind != "knee" or floor is None:
        return note
    dense = float(best[compute]) / fraction
    within = front[
        (front[M.ACCURACY] >= floor * front[M.ACCURACY].max()) & (front[compute] <= DENSE_SHARE_WANTED * dense)
    ]
    if within.empty:
        return note + (f"<b>No configuration within the selection's accuracy floor costs "
                       f"{100 * DENSE_SHARE_WANTED:.0f}% of dense's {what} or less at L={length}</b>: the cheaper ones "
                       "on the front lose more accuracy than the rule allows (see the front below). ")  # fmt: skip
    other = within.sort_values([M.ACCURACY, compute], ascending=[False, True]).iloc[0]
    rule = f"max-accuracy-under-{M.compute_choice(compute)}={float(other[compute])!r}"  # (exact: it must pick it)
    return note + (f"Trial {int(other['trial'])}, within the selection's accuracy floor (accuracy "
                   f"{float(other[M.ACCURACY]):.3f}), costs {100 * float(other[compute]) / dense:.0f}% of dense's "
                   f"{what}: <code>--select {rule}</code> picks it. ")  # fmt: skip


def _scale_section(run_dir: Path) -> str:
    """The scale check's table and Kendall's tau ('' before ``attn-search confirm --seq-len``)."""
    path = (run_dir / SCALE_FILE).with_suffix(".json")
    if not path.is_file():
        return ""
    data = json.loads(path.read_text())
    tau = data["kendall_tau"]
    verdict = (f"<b>Warning: weak (below {data['weak_below']})</b>: the proxy does not rank these configurations as "
               "the larger scale does; prefer the scale's accuracies" if data["weak"] else "the proxy's ranking holds")  # fmt: skip
    rows = pd.DataFrame(data["points"])
    return (f"<h2>Scale check</h2><p>The front retrained at seq_len {data['seq_len']}, d_model {data['d_model']}, "
            f"n_layers {data['n_layers']}, {data['steps']} steps ({html.escape(data['task'])}). Kendall's tau between "
            f"proxy and scale accuracies: {tau:.2f}: {verdict}.</p>"
            f"{_table(rows, ['trial', 'config', 'accuracy_proxy', 'accuracy_scale'])}")  # fmt: skip


def _latency_note(df: pd.DataFrame) -> str:
    """Which trials' latency is unreliable: their timed runs varied more than ``LATENCY_SPREAD_WARN``."""
    if M.LATENCY_SPREAD not in df.columns:
        return ""
    noisy = df[df[M.LATENCY_SPREAD] > M.LATENCY_SPREAD_WARN]
    if noisy.empty:
        return ""
    listed = ", ".join(f"{int(t)} ({s:.1f}x)" for t, s in zip(noisy["trial"], noisy[M.LATENCY_SPREAD], strict=True))
    return (
        f" <b>Latency unreliable</b> for trial(s) {html.escape(listed)}: their timed forward passes varied more "
        f"than {M.LATENCY_SPREAD_WARN:g}x (slowest over fastest), so the machine was busy while they were timed."
    )


def _spread(row: pd.Series) -> str:
    """`` ± 0.012 over 3 seeds`` for a confirmed row ('' otherwise)."""
    if "seeds" not in row or pd.isna(row.get("accuracy_sd")):
        return ""
    return f" ± {row['accuracy_sd']:.3f} (mean over {int(row['seeds'])} seeds)"


def _confirm_note(front: pd.DataFrame) -> str:
    if "seeds" not in front.columns:
        return ("<p>Each accuracy is one training run (one seed); <code>attn-search confirm RUN --seeds K</code> "
                "retrains the front with more seeds.</p>")  # fmt: skip
    noisy = int((front.get("within_noise_of", pd.Series(dtype=str)) != "").sum())
    return (f"<p>Confirmed: each front point was retrained with more seeds; <i>accuracy</i> is the mean over "
            f"<i>seeds</i> runs, <i>accuracy_sd</i> their standard deviation, <i>accuracy_search</i> the search's own "
            f"run. The front and the selection use the mean. {noisy} point(s) are <i>within noise</i> of the next: "
            "their accuracies differ by less than the larger standard deviation, so their order is not settled."
            "</p>")  # fmt: skip


def target_note(space: SearchSpace) -> str:
    """What ``target_len`` means for the compute figures ('' without one)."""
    if space.target_len is None:
        return ""
    return (f" Compute objectives (FLOPs, attention FLOPs; latency and memory of a forward pass) are at sequence length "
            f"{space.target_len}, the target length; accuracy was trained at the task's length. Pattern parameters "
            "are absolute: a window of 46 covers 46 positions at any length.")  # fmt: skip


def _bounds_text(space: SearchSpace, bounds: Bounds) -> str:
    parts = []
    for m in space.metrics[1:]:
        b = bounds.get(m)
        parts.append(
            f"{m}: fixed range [{b[0]:.4g}, {b[1]:.4g}]" if b is not None else f"{m}: from 0 to the largest seen"
        )
    return ("This run: " + "; ".join(parts) + ".") if parts else ""


def load_run(run_dir: str | Path) -> tuple[optuna.Study, SearchSpace, RunRecord]:
    """Open a run dir's study, space and record (for ``report``, ``export`` and ``confirm``);
    ``ValueError`` if it is not one."""
    run_dir = Path(run_dir)
    record = RunRecord.read(run_dir)
    space = parse_space(record.space_definition, source=str(run_dir / RUN_FILE))
    storage = record.storage or f"sqlite:///{(run_dir / 'study.db').resolve()}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=record.study_name, storage=storage)
    return study, space, record


def rebuild(run_dir: str | Path, *, select: str | None = None) -> Path:
    """Write every output of ``run_dir`` again from its study; returns the report's path.

    A ``select`` rule becomes the run's own (saved in ``run.json``), so that ``best_config.yaml``,
    the report and a later ``attn-search export`` without ``--select`` agree on one configuration."""
    study, space, record = load_run(run_dir)
    if select is not None:
        parse_selection(select)
        record = record.with_select(select)
        record.write(run_dir)
    outputs = RunOutputs.from_record(Path(run_dir), record, space, select=select)
    outputs.write_all(study)
    return Path(run_dir) / "report.html"
