"""Search spaces: a declarative YAML format in one neutral form, translated at the edges.

Format (see ``search_spaces/sparse.yaml``)::

    name: sparse
    description: free text
    task: {name: mqar, params: {seq_len: 256}}      # default task (a name or module:callable)
    objectives: {accuracy: maximize, flops: minimize}
    fixed: {d_model: 64, n_layers: 1}              # AttentionConfig fields held constant
    target_len: 4096                                # optional: compute objectives at this length
    params:                                         # searched AttentionConfig fields, in order
      n_heads: {type: categorical, choices: [2, 4, 8]}
      pattern: {type: categorical, choices: [dense, window, longformer]}
      window:  {type: int, low: 8, high: 128, log: true, when: {pattern: [window, longformer]}}
      lr:      {type: float, low: 1.0e-3, high: 1.0e-2, log: true}

``type`` is ``int``, ``float`` (``log``, ``step`` optional) or ``categorical`` (``choices``).
``when`` makes a parameter conditional: it is searched only when every named earlier parameter
takes one of the listed values (otherwise the config keeps its fixed/default value). Objectives
are metric names (``accuracy``, ``flops``, ``params``, ``latency_ms``, ``peak_mem_mb``) with
their directions; the compute objective can be swapped at run time (``--compute``).

Errors name the file, the key and what is wrong (:class:`SpaceError`, a ``ValueError``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from attn_search.engine import metrics as M
from attn_search.engine.config import _FIELD_TYPES, AttentionConfig
from attn_search.engine.tasks import make_task

BUILTIN_SPACES = ("sparse", "dense", "full")


class SpaceError(ValueError):
    """A malformed search space; the message names the file and the key."""


@dataclasses.dataclass(frozen=True)
class Param:
    """One searched parameter in neutral form."""

    name: str
    kind: str  # "int" | "float" | "categorical"
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()
    when: tuple[tuple[str, tuple[Any, ...]], ...] = ()

    def active(self, values: Mapping[str, Any]) -> bool:
        """Whether every condition holds for the values chosen so far."""
        return all(name in values and values[name] in allowed for name, allowed in self.when)

    def grid(self, bins: int) -> list[Any]:
        """``bins`` representative values (all choices for a categorical), log-spaced when ``log``."""
        if self.kind == "categorical":
            return list(self.choices)
        assert self.low is not None and self.high is not None
        if self.log:
            raw = [
                math.exp(math.log(self.low) + (math.log(self.high) - math.log(self.low)) * i / max(1, bins - 1))
                for i in range(bins)
            ]
        else:
            raw = [self.low + (self.high - self.low) * i / max(1, bins - 1) for i in range(bins)]
        if self.kind == "int":
            return sorted({round(v) for v in raw})
        return raw


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    """A parsed, validated search space."""

    name: str
    params: tuple[Param, ...]
    fixed: Mapping[str, Any]
    objectives: tuple[tuple[str, str], ...]  # (metric, direction)
    task: str
    task_params: Mapping[str, Any]
    description: str = ""
    source: str = "<dict>"
    target_len: int | None = None
    """Sequence length the compute objectives are reported at (the length the user deploys);
    ``None``: the task's. Accuracy is trained at the task's length either way."""

    @property
    def directions(self) -> list[str]:
        return [d for _, d in self.objectives]

    @property
    def metrics(self) -> list[str]:
        return [m for m, _ in self.objectives]

    @property
    def fixed_size(self) -> bool:
        """Whether width and depth are fixed (no ``d_model`` or ``n_layers`` parameter): whole-model
        FLOPs then differ from the attention's by one constant for every configuration."""
        return not ({"d_model", "n_layers"} & {p.name for p in self.params})

    def own_compute(self) -> str | None:
        """The ``--compute`` choice of the space's first compute objective (``None``: accuracy only):
        what a search counts when ``--compute`` is not given."""
        own = [m for m in self.metrics if m != M.ACCURACY]  # (parse_space admits compute metrics only)
        return M.compute_choice(own[0]) if own else None

    def with_compute(self, compute: str | None) -> SearchSpace:
        """Replace the compute objective(s) by ``compute`` (a ``--compute`` choice), or drop them
        (``None``: accuracy only)."""
        acc = [(m, d) for m, d in self.objectives if m == M.ACCURACY]
        if compute is None:
            return dataclasses.replace(self, objectives=tuple(acc))
        metric = M.COMPUTE_OBJECTIVES[compute]
        return dataclasses.replace(self, objectives=(*acc, (metric, M.DIRECTIONS[metric])))

    def head_range(self) -> tuple[int, int] | None:
        """The (fewest, most) heads a configuration of this space can have (``None``: unknown), so a
        population's attention layout can be sized for every refill from the start."""
        by_name = {p.name: p for p in self.params}
        if "n_heads" in by_name:
            p = by_name["n_heads"]
            values = [int(v) for v in p.choices] if p.kind == "categorical" else [int(p.low), int(p.high)]  # type: ignore[arg-type]
            d_model = int(self.fixed.get("d_model", 64))
            return (min(values), max(values)) if d_model % max(values) == 0 else None
        if "n_heads" in self.fixed:
            return (int(self.fixed["n_heads"]),) * 2
        return None

    def suggest(self, trial: Any) -> dict[str, Any]:
        """Ask an Optuna trial (define-by-run) for every active parameter, in order."""
        values: dict[str, Any] = {}
        for p in self.params:
            if not p.active(values):
                continue
            if p.kind == "categorical":
                values[p.name] = trial.suggest_categorical(p.name, list(p.choices))
            elif p.kind == "int":
                step = int(p.step or 1)
                values[p.name] = trial.suggest_int(p.name, int(p.low), int(p.high), log=p.log, step=step)  # type: ignore[arg-type]
            else:
                values[p.name] = trial.suggest_float(p.name, p.low, p.high, log=p.log, step=p.step)  # type: ignore[arg-type]
        return values

    def active_values(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """Keep only the parameters active under ``values`` (in order)."""
        out: dict[str, Any] = {}
        for p in self.params:
            if p.name in values and p.active(out):
                out[p.name] = values[p.name]
        return out

    def make_config(self, values: Mapping[str, Any], *, seed: int | None = None) -> AttentionConfig:
        """The config of a proposal: defaults, then ``fixed``, then the active searched values."""
        fields = {**self.fixed, **self.active_values(values)}
        if seed is not None:
            fields["seed"] = seed
        return AttentionConfig.from_dict(fields)

    def fingerprint(self) -> str:
        """Hash of everything that defines the space (used to refuse resuming with another one)."""
        blob = json.dumps(
            {
                "params": [dataclasses.asdict(p) for p in self.params],
                "fixed": dict(self.fixed),
                "objectives": self.objectives,
                "task": self.task,
                "task_params": dict(self.task_params),
                **({"target_len": self.target_len} if self.target_len is not None else {}),
            },
            sort_keys=True,
            default=str,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        """The YAML form (``load_space(dump(to_dict()))`` gives an equal space)."""
        params: dict[str, Any] = {}
        for p in self.params:
            d: dict[str, Any] = {"type": p.kind}
            if p.kind == "categorical":
                d["choices"] = list(p.choices)
            else:
                d.update(low=p.low, high=p.high)
                if p.log:
                    d["log"] = True
                if p.step is not None:
                    d["step"] = p.step
            if p.when:
                d["when"] = {k: list(v) for k, v in p.when}
            params[p.name] = d
        return {
            "name": self.name,
            "description": self.description,
            "task": {"name": self.task, "params": dict(self.task_params)},
            "objectives": dict(self.objectives),
            "fixed": dict(self.fixed),
            "params": params,
            **({"target_len": self.target_len} if self.target_len is not None else {}),
        }


def space_path(spec: str) -> Path:
    """The file of a built-in space name, or ``spec`` itself as a path."""
    if spec in BUILTIN_SPACES:
        return Path(str(resources.files("attn_search.search_spaces") / f"{spec}.yaml"))
    path = Path(spec)
    if path.suffix.lower() not in (".yaml", ".yml"):
        raise SpaceError(f"--space {spec!r} is neither a built-in space ({', '.join(BUILTIN_SPACES)}) nor a .yaml file")
    if not path.is_file():
        raise SpaceError(f"--space {spec!r}: no such file")
    return path


def load_space(spec: str | Path) -> SearchSpace:
    """Load a built-in space by name or a user's YAML file; raises :class:`SpaceError`."""
    path = space_path(str(spec))
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SpaceError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from exc
    return parse_space(data, source=str(path))


_TOP_KEYS = {"name", "description", "task", "objectives", "fixed", "params", "target_len"}
_PARAM_KEYS = {"type", "low", "high", "log", "step", "choices", "when"}


def parse_space(data: Any, *, source: str = "<dict>") -> SearchSpace:
    """Validate the YAML form of a space (see module docstring) into a :class:`SearchSpace`."""

    def fail(key: str, why: str) -> SpaceError:
        return SpaceError(f"{source}: {key}: {why}")

    if not isinstance(data, dict):
        raise SpaceError(f"{source}: the file must hold a mapping with keys {', '.join(sorted(_TOP_KEYS))}")
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise fail(unknown[0], f"unknown key; valid top-level keys are {', '.join(sorted(_TOP_KEYS))}")

    # task
    task_raw = data.get("task", {"name": "mqar"})
    if isinstance(task_raw, str):
        task_raw = {"name": task_raw}
    if not isinstance(task_raw, dict) or not isinstance(task_raw.get("name"), str):
        raise fail("task", "must be a task name or a mapping {name: ..., params: {...}}")
    task_params = task_raw.get("params") or {}
    if not isinstance(task_params, dict):
        raise fail("task.params", "must be a mapping of task parameters")
    if ":" not in task_raw["name"]:
        try:
            make_task(task_raw["name"], **task_params)
        except ValueError as exc:
            raise fail("task", str(exc)) from exc

    # objectives
    obj_raw = data.get("objectives", {M.ACCURACY: M.MAXIMIZE, M.FLOPS: M.MINIMIZE})
    if isinstance(obj_raw, list):
        obj_raw = {m: M.DIRECTIONS.get(m) for m in obj_raw}
    if not isinstance(obj_raw, dict) or not obj_raw:
        raise fail("objectives", "must map metric names to maximize/minimize")
    objectives = []
    for metric, direction in obj_raw.items():
        if metric not in M.DIRECTIONS:
            raise fail(f"objectives.{metric}", f"unknown metric; use {', '.join(M.DIRECTIONS)}")
        if direction not in (M.MAXIMIZE, M.MINIMIZE):
            raise fail(f"objectives.{metric}", f"direction {direction!r} must be maximize or minimize")
        objectives.append((metric, direction))
    if M.ACCURACY not in obj_raw:
        raise fail("objectives", "must include accuracy")
    if len(objectives) > 3:
        raise fail("objectives", "at most 3 objectives are supported (exact hypervolume)")
    # accuracy first, the rest in the order given: the search, its reports and its strategies read
    # metrics[0] as accuracy and metrics[1] as the compute it counts (a YAML listing compute first
    # once made ppo's head and the policy's costs read the wrong objective)
    objectives.sort(key=lambda o: o[0] != M.ACCURACY)

    # fixed
    fixed = data.get("fixed") or {}
    if not isinstance(fixed, dict):
        raise fail("fixed", "must be a mapping of AttentionConfig fields to values")
    for key in fixed:
        if key not in _FIELD_TYPES:
            raise fail(f"fixed.{key}", f"not an AttentionConfig field; valid fields: {', '.join(_FIELD_TYPES)}")
    try:
        AttentionConfig.from_dict(dict(fixed))
    except ValueError as exc:
        raise fail("fixed", str(exc)) from exc

    # params
    params_raw = data.get("params")
    if not isinstance(params_raw, dict) or not params_raw:
        raise fail("params", "must be a non-empty mapping of AttentionConfig fields to parameter specs")
    params: list[Param] = []
    for name, spec in params_raw.items():
        key = f"params.{name}"
        if name not in _FIELD_TYPES:
            raise fail(key, f"not an AttentionConfig field; valid fields: {', '.join(_FIELD_TYPES)}")
        if name in fixed:
            raise fail(key, "is both fixed and searched; remove it from one of them")
        if not isinstance(spec, dict):
            raise fail(key, "must be a mapping with a 'type'")
        bad = sorted(set(spec) - _PARAM_KEYS)
        if bad:
            raise fail(f"{key}.{bad[0]}", f"unknown key; valid keys are {', '.join(sorted(_PARAM_KEYS))}")
        params.append(_parse_param(name, spec, key, fail, [p.name for p in params], {p.name: p for p in params}))

    target_len = data.get("target_len")
    if target_len is not None and (isinstance(target_len, bool) or not isinstance(target_len, int) or target_len < 1):
        raise fail("target_len", f"{target_len!r} must be a positive integer (a sequence length)")

    space = SearchSpace(
        name=str(data.get("name", Path(source).stem)),
        target_len=target_len,
        params=tuple(params),
        fixed=dict(fixed),
        objectives=tuple(objectives),
        task=task_raw["name"],
        task_params=dict(task_params),
        description=str(data.get("description", "")),
        source=source,
    )
    _check_values_make_configs(space, fail)
    return space


def _number(value: Any, key: str, fail: Any) -> float:
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = float(value)  # YAML 1.1 reads 1e-3 as a string
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise fail(key, f"must be a number, got {value!r}")
    return float(value)


def _parse_param(
    name: str, spec: dict[str, Any], key: str, fail: Any, earlier: list[str], by_name: dict[str, Param]
) -> Param:
    kind = spec.get("type")
    when_raw = spec.get("when") or {}
    if not isinstance(when_raw, dict):
        raise fail(f"{key}.when", "must map earlier parameter names to a value or a list of values")
    when = []
    for cond, allowed in when_raw.items():
        if cond not in earlier:
            raise fail(f"{key}.when.{cond}", f"must name a parameter defined before {name!r}")
        allowed_t = tuple(allowed) if isinstance(allowed, list) else (allowed,)
        parent = by_name[cond]
        if parent.kind == "categorical":
            missing = [a for a in allowed_t if a not in parent.choices]
            if missing:
                raise fail(
                    f"{key}.when.{cond}", f"{missing[0]!r} is not one of {cond}'s choices {list(parent.choices)}"
                )
        when.append((cond, allowed_t))
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise fail(f"{key}.choices", "a categorical parameter needs a non-empty list of choices")
        return Param(name, "categorical", choices=tuple(choices), when=tuple(when))
    if kind not in ("int", "float"):
        raise fail(f"{key}.type", f"{kind!r} is unknown; use int, float or categorical")
    if "low" not in spec or "high" not in spec:
        raise fail(key, f"an {kind} parameter needs low and high")
    low, high = _number(spec["low"], f"{key}.low", fail), _number(spec["high"], f"{key}.high", fail)
    if low >= high:
        raise fail(key, f"low={spec['low']} must be below high={spec['high']}")
    log = bool(spec.get("log", False))
    if log and low <= 0:
        raise fail(f"{key}.log", f"a log-scaled parameter needs low > 0, got {spec['low']}")
    step = spec.get("step")
    if step is not None:
        step = _number(step, f"{key}.step", fail)
        if log:
            raise fail(f"{key}.step", "step and log cannot be combined")
    if kind == "int" and (not float(low).is_integer() or not float(high).is_integer()):
        raise fail(key, "an int parameter needs integer low and high")
    return Param(name, kind, low=low, high=high, log=log, step=step, when=tuple(when))


def _check_values_make_configs(space: SearchSpace, fail: Any) -> None:
    """Every bound and choice of every parameter must give a valid config on its own."""
    for p in space.params:
        values = p.grid(2) if p.kind != "categorical" else list(p.choices)
        for value in values:
            try:
                space.make_config({p.name: value} | _activating(space, p))
            except ValueError as exc:
                raise fail(f"params.{p.name}", f"value {value!r} gives an invalid config: {exc}") from exc


def _activating(space: SearchSpace, p: Param) -> dict[str, Any]:
    """Values of earlier parameters that make ``p`` active (first allowed value of each)."""
    return {cond: allowed[0] for cond, allowed in p.when}
