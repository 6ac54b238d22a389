"""``AttentionConfig``: the frozen, validated, serialisable result of one proposal."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from attn_search.engine.patterns import DECLARED, PARAM_SPECS, PATTERN_PARAMS, keeps_everything


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """Everything needed to build and train one small attention model.

    Every field has a default that trains a sensible small model on the default task, so a config
    can be given as just the fields that differ: ``AttentionConfig.from_dict({"pattern": "window",
    "window": 32})``. Pattern parameters share their names with
    :func:`attn_search.pattern_mask`. A pattern parameter the pattern does not read is reset to its
    default and left out when the config is written: two configs that build the same model are
    equal, and a written config lists only what its pattern uses.
    """

    d_model: int = 64
    """Width of the residual stream."""
    n_layers: int = 1
    """Number of transformer blocks."""
    n_heads: int = 4
    """Attention heads per block; must divide ``d_model``."""
    pattern: str = "dense"
    """Sparsity pattern: one of dense, window, dilated, strided, bigbird, longformer."""
    window: int = 32
    """window / dilated / longformer: a query sees keys with ``|i - j| < window`` (in dilation steps)."""
    dilation: int = 2
    """dilated: spacing between attended keys."""
    stride: int = 16
    """strided: local band width and column period."""
    block_size: int = 16
    """bigbird: tokens per block."""
    n_global: int = 1
    """bigbird: global blocks; longformer: global tokens (at the start of the sequence)."""
    n_random: int = 1
    """bigbird: random key blocks per query block (drawn from ``seed``)."""
    causal: bool = True
    """Mask future keys (autoregressive model)."""
    dropout: float = 0.0
    """Dropout on embeddings, attention output and MLP output."""
    attn_dropout: float = 0.0
    """Attention dropout as DropKey (Li et al. 2023): each key but the query's own is dropped from
    the query's softmax with this probability, before the softmax (not dropout on the
    probabilities after it), on every device; on CUDA inside the fused kernel."""
    weight_decay: float = 0.01
    """AdamW weight decay on matrices (not on biases, norms or embeddings)."""
    label_smoothing: float = 0.0
    """Label smoothing of the cross-entropy loss."""
    lr: float = 5e-3
    """Peak learning rate (after warm-up, then cosine decay to 10%)."""
    warmup_steps: int = 30
    """Linear warm-up steps."""
    batch_size: int = 32
    """Sequences per training step."""
    seed: int = 0
    """Seed of initialisation, data order, dropout and BigBird's random blocks."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            expected = _FIELD_TYPES[f.name]
            if expected is float and isinstance(value, int) and not isinstance(value, bool):
                object.__setattr__(self, f.name, float(value))
            elif not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
                raise ValueError(
                    f"{f.name}={value!r} is invalid: expected {expected.__name__}, got {type(value).__name__}"
                )
        _validate(self)
        for name in unused_pattern_fields(self.pattern):
            object.__setattr__(self, name, _DEFAULTS[name])

    # -- derived values, computed in one place -----------------------------------------------
    @property
    def head_dim(self) -> int:
        """Channels per head: ``d_model // n_heads``."""
        return self.d_model // self.n_heads

    def pattern_params(self) -> dict[str, int]:
        """The keyword parameters the pattern reads (``seed`` feeds BigBird's random blocks)."""
        return {name: getattr(self, name) for name in PATTERN_PARAMS[self.pattern]}

    def describe(self) -> str:
        """Short human label, e.g. ``window(w=32) h=4``."""
        params = ", ".join(
            f"{PARAM_SPECS[k].short}={v}" for k, v in self.pattern_params().items() if PARAM_SPECS[k].short
        )
        return f"{self.pattern}({params}) h={self.n_heads}" if params else f"{self.pattern} h={self.n_heads}"

    # -- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The fields as plain Python values, without the pattern parameters the pattern does not
        read (``from_dict(to_dict())`` is the identity)."""
        unused = unused_pattern_fields(self.pattern)
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in unused}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AttentionConfig:
        """Build from a mapping of field names; missing fields take defaults.

        Raises ``ValueError`` for unknown keys (listing the valid ones) and invalid values.
        """
        if not isinstance(data, dict):
            raise ValueError(f"a config must be a mapping of field names to values, got {type(data).__name__}")
        unknown = sorted(set(data) - set(_FIELD_TYPES))
        if unknown:
            raise ValueError(
                f"unknown config field(s) {', '.join(unknown)}: valid fields are {', '.join(_FIELD_TYPES)}"
            )
        return cls(**{k: _coerce(k, v) for k, v in data.items()})

    def replace(self, **changes: Any) -> AttentionConfig:
        """A copy with ``changes`` applied and validated."""
        return AttentionConfig.from_dict({**self.to_dict(), **changes})

    def save(self, path: str | Path) -> Path:
        """Write YAML (``.yaml``/``.yml``) or JSON (``.json``); returns the path."""
        import yaml  # here, not at the top: the exported model file carries this module and needs only torch

        path = Path(path)
        fmt = _format_of(path)
        text = (
            json.dumps(self.to_dict(), indent=2) + "\n"
            if fmt == "json"
            else yaml.safe_dump(self.to_dict(), sort_keys=False)
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    @classmethod
    def load(cls, path: str | Path) -> AttentionConfig:
        """Read a file written by :meth:`save` (or by ``attn-search export``)."""
        import yaml

        path = Path(path)
        fmt = _format_of(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise ValueError(f"cannot read config {path}: {exc.strerror}") from exc
        try:
            data = json.loads(text) if fmt == "json" else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as exc:
            raise ValueError(f"{path}: not valid {fmt.upper()}: {str(exc).splitlines()[0]}") from exc
        if isinstance(data, dict) and isinstance(data.get("config"), dict):
            data = data["config"]  # an export file wraps the config with metrics and provenance
        try:
            return cls.from_dict(data)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from exc


_FIELD_TYPES: dict[str, type] = {
    "d_model": int, "n_layers": int, "n_heads": int, "pattern": str, "window": int, "dilation": int,
    "stride": int, "block_size": int, "n_global": int, "n_random": int, "causal": bool,
    "dropout": float, "attn_dropout": float, "weight_decay": float, "label_smoothing": float,
    "lr": float, "warmup_steps": int, "batch_size": int, "seed": int,
}  # fmt: skip


PATTERN_FIELDS = tuple(name for name in PARAM_SPECS if name != "seed")
"""Fields that only some patterns read, from the patterns' declarations (``seed`` also seeds
training, so it is always kept)."""


def unused_pattern_fields(pattern: str) -> tuple[str, ...]:
    """The pattern parameters ``pattern`` does not read (left out when a config is written)."""
    used = PATTERN_PARAMS.get(pattern, ())
    return tuple(name for name in PATTERN_FIELDS if name not in used)


def _coerce(name: str, value: Any) -> Any:
    """Accept what YAML and JSON produce: ``1e-3`` (a string in YAML 1.1) and ``2.0`` for ints."""
    expected = _FIELD_TYPES[name]
    if expected is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    if expected is int and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


_DEFAULTS: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(AttentionConfig)}


def _format_of(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".yaml", ".yml"):
        return "yaml"
    if suffix == ".json":
        return "json"
    raise ValueError(f"{path}: unknown config format {suffix or '(none)'}: use .yaml, .yml or .json")


def _validate(c: AttentionConfig) -> None:
    if c.pattern not in DECLARED:
        raise ValueError(f"pattern={c.pattern!r} is unknown: use one of {', '.join(DECLARED)}")
    for name in ("d_model", "n_layers", "n_heads", "batch_size"):
        if getattr(c, name) < 1:
            raise ValueError(f"{name}={getattr(c, name)} is invalid: it must be >= 1")
    for name in ("warmup_steps", "seed"):
        if getattr(c, name) < 0:
            raise ValueError(f"{name}={getattr(c, name)} is invalid: it must be >= 0")
    for spec in PARAM_SPECS.values():  # every pattern parameter, at its declared minimum
        if getattr(c, spec.name) < spec.minimum:
            raise ValueError(f"{spec.name}={getattr(c, spec.name)} is invalid: it must be >= {spec.minimum}")
    if c.d_model % c.n_heads:
        divisors = [h for h in range(1, c.d_model + 1) if c.d_model % h == 0 and h <= 64]
        raise ValueError(
            f"n_heads={c.n_heads} does not divide d_model={c.d_model}: use n_heads in {divisors} or change d_model"
        )
    if (c.d_model // c.n_heads) % 2:
        raise ValueError(
            f"d_model={c.d_model} / n_heads={c.n_heads} gives an odd head size {c.d_model // c.n_heads}: rotary "
            "embeddings need an even head size; change n_heads or d_model"
        )
    for name in ("dropout", "attn_dropout", "label_smoothing"):
        value = getattr(c, name)
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name}={value} is invalid: it must be in [0, 1)")
    if not (math.isfinite(c.lr) and c.lr > 0):
        raise ValueError(f"lr={c.lr} is invalid: it must be a finite number > 0 (e.g. 1e-3)")
    if not (math.isfinite(c.weight_decay) and c.weight_decay >= 0):
        raise ValueError(f"weight_decay={c.weight_decay} is invalid: it must be >= 0")


def load_config(path: str | Path) -> AttentionConfig:
    """Read an :class:`AttentionConfig` from a YAML or JSON file (a plain config or an export)."""
    return AttentionConfig.load(path)


def simplest_equivalent(config: AttentionConfig, lengths: Sequence[int]) -> tuple[AttentionConfig, str] | None:
    """Dense attention with ``config``'s other fields, and why, where ``config``'s sparse pattern
    keeps every entry at each of ``lengths`` (BigBird(32, 4, 3) at L=256); ``None`` otherwise."""
    if config.pattern == "dense" or not lengths:
        return None
    params = config.pattern_params()
    if not all(keeps_everything(config.pattern, int(L), causal=config.causal, **params) for L in lengths):
        return None
    at = " and ".join(f"L={int(L)}" for L in sorted(set(lengths)))
    return as_dense(config), f"dense: {config.describe()} keeps every entry at {at}"


def as_dense(config: AttentionConfig) -> AttentionConfig:
    """``config`` with dense attention and its other fields unchanged."""
    return AttentionConfig.from_dict({**{k: v for k, v in config.to_dict().items() if k not in PATTERN_FIELDS},
                                      "pattern": "dense"})  # fmt: skip
