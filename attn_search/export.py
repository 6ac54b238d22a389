"""Export the chosen configuration to training code.

``yaml``/``json``: the config with its metrics and provenance (``attn_search.load_config`` reads
it back). ``python``: one self-contained module that needs only torch, written from the engine's
own source (:data:`ENGINE_MODULES`, copied verbatim with their imports of each other removed), so
it cannot drift from what the search trained and measured. It defines ``CONFIG`` (the chosen
:class:`AttentionConfig`), ``SearchedAttention(d_model, n_heads)``, a drop-in self-attention layer
``(B, L, d_model) -> (B, L, d_model)`` with the chosen pattern and its parameters baked in, and
``build_model()`` returning the whole searched model, the engine's own class, so trained weights
load into it. Both run on the engine's sparse paths (``backend="auto"``): FlexAttention with the
pattern's ``BlockMask`` on CUDA, the block-sparse kernel on CPU where the pattern skips enough
tiles, so a user's model saves the compute the search counted. Pattern parameters are absolute
positions (a window of 46 keys stays 46 at any sequence length).
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path
from types import ModuleType
from typing import Any

from attn_search.engine import attention, model, patterns
from attn_search.engine import config as config_module
from attn_search.engine.config import AttentionConfig
from attn_search.engine.tasks import make_task
from attn_search.outputs import RunOutputs, export_dict, export_text, load_run, rebuild, select_row

FORMATS = ("yaml", "json", "python")
ENGINE_MODULES: tuple[ModuleType, ...] = (patterns, attention, config_module, model)
"""The engine modules the exported file carries, in the order they import each other."""


_REPLACED = {"build_model"}
"""Engine functions the exported file defines its own way (``build_model()`` needs no task object)."""


def _split_module(module: ModuleType) -> tuple[list[str], str]:
    """``module``'s import statements (not ``__future__`` nor attn_search's) and its body without
    docstring and imports."""
    source = inspect.getsource(module)
    lines = source.splitlines()
    tree = ast.parse(source)
    drop: set[int] = set()
    imports: list[str] = []
    for i, node in enumerate(tree.body):
        span = range(node.lineno - 1, node.end_lineno or node.lineno)
        if i == 0 and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            drop.update(span)  # the docstring
        elif getattr(node, "name", None) in _REPLACED:
            drop.update(range(min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", []))]) - 1,
                              node.end_lineno or node.lineno))  # fmt: skip
        elif isinstance(node, ast.Import | ast.ImportFrom):
            drop.update(span)
            if not (isinstance(node, ast.ImportFrom) and (node.module or "").startswith(("attn_search", "__future__"))):
                imports.append("\n".join(lines[n] for n in span))
    body = "\n".join(line for n, line in enumerate(lines) if n not in drop).strip()
    return imports, f"# {'-' * 30} {module.__name__.replace('.', '/')}.py {'-' * 30}\n{body}\n"


def engine_source() -> str:
    """The source of :data:`ENGINE_MODULES` as one module: their imports once, then their bodies."""
    imports: list[str] = []
    bodies = []
    for module in ENGINE_MODULES:
        found, body = _split_module(module)
        imports += [line for line in found if line not in imports]
        bodies.append(body)
    return "\n".join(imports) + "\n\n\n" + "\n\n".join(bodies)


def python_module(config: AttentionConfig, *, vocab_size: int, n_classes: int, max_len: int, header: str = "") -> str:
    """Source of the self-contained torch module for ``config`` (see module docstring)."""
    params = ", ".join(f"{k}={v}" for k, v in config.pattern_params().items()) or "none"
    return f'''"""Attention layer and model exported by attn_search. Needs only torch.

{header}
Configuration: {config.describe()}, causal={config.causal}; pattern parameters ({params}) are
absolute positions, the same at any sequence length.

``SearchedAttention(d_model, n_heads)`` is a drop-in self-attention layer, (B, L, d_model) in and
out, with this pattern baked in; ``build_model()`` returns the searched model (token and
previous-token embeddings, {config.n_layers} pre-LayerNorm block(s) with rotary positions, a
per-position classifier) with attn_search's parameter names, so its state_dict loads here.
Attention runs on the sparse paths the search measured (``backend="auto"``): FlexAttention with the
pattern's BlockMask on CUDA, the block-sparse kernel on CPU where the pattern skips enough tiles.
Pass ``backend="reference"`` for the dense masked path (any device, the slowest).

What follows is attn_search's engine source, verbatim; the searched configuration is at the end.
"""

from __future__ import annotations

import sys as _sys

if _sys.modules.get(__name__) is None:
    # Loaded by importlib (spec_from_file_location + exec_module) without registering: dataclasses
    # look a class's module up in sys.modules while making it, so this module is registered here.
    class _ThisModule:
        pass

    _this = _ThisModule()
    _this.__dict__ = globals()
    _sys.modules[__name__] = _this  # type: ignore[assignment]

{engine_source()}

# {"-" * 30} the searched configuration {"-" * 30}
CONFIG = AttentionConfig.from_dict({config.to_dict()!r})
VOCAB_SIZE = {vocab_size}
N_CLASSES = {n_classes}
MAX_LEN = {max_len}
PATTERN = CONFIG.pattern


class SearchedAttention(SparseSelfAttention):
    """Self-attention with the searched pattern and its parameters: ``(B, L, d_model) -> (B, L, d_model)``.

    ``d_model`` and ``n_heads`` fit it into your model (``d_model // n_heads`` must be even, for
    rotary positions); ``overrides`` change any other field of ``CONFIG`` (``dropout``, ``causal``).
    """

    def __init__(self, d_model: int = CONFIG.d_model, n_heads: int = CONFIG.n_heads, *, backend: str = "auto",
                 **overrides: Any) -> None:
        super().__init__(CONFIG.replace(d_model=d_model, n_heads=n_heads, **overrides), backend=backend)


def build_model(backend: str = "auto", max_len: int = MAX_LEN) -> AttentionModel:
    """The searched model, untrained (load a state_dict from attn_search.build_model to reuse weights);
    ``max_len``: the longest sequence it accepts (rotary positions have no limit of their own)."""
    return AttentionModel(CONFIG, vocab_size=VOCAB_SIZE, n_classes=N_CLASSES, max_len=max_len, backend=backend)


__all__ = ["CONFIG", "PATTERN", "AttentionModel", "SearchedAttention", "SparseSelfAttention", "build_model"]
'''


def export_run(
    run_dir: str | Path, *, fmt: str = "yaml", select: str | None = None, out: str | Path | None = None
) -> Path:
    """Export the configuration ``select`` picks from ``run_dir``; returns the written file."""
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r} is unknown: use one of {', '.join(FORMATS)}")
    study, space, record = load_run(run_dir)
    if select is not None and select != record.get("options", {}).get("select", "knee"):
        rebuild(run_dir, select=select)  # the run's outputs follow the new rule, so they agree with this export
        study, space, record = load_run(run_dir)
    outputs = RunOutputs.from_record(Path(run_dir), record, space, select=select)
    rule = outputs.select
    row = select_row(outputs.frame(study), space, rule)
    if row is None:
        raise ValueError(f"{run_dir}: no complete trial satisfies --select {rule}")
    suffix = {"yaml": "yaml", "json": "json", "python": "py"}[fmt]
    path = (
        Path(out)
        if out
        else Path(run_dir) / f"exported_model.{suffix}"
        if fmt == "python"
        else Path(out or Path(run_dir) / f"best_config.{suffix}")
    )
    if fmt == "python":
        data: dict[str, Any] = export_dict(row, outputs, rule)
        config = AttentionConfig.from_dict(data["config"])
        task = make_task(outputs.task_name, **outputs.task_kwargs)  # the task actually searched
        header = (
            f"Trial {data['trial']} of {run_dir} (space {space.name!r}, task {data['task']} {data['task_params']}, "
            f"selected by --select {rule}); metrics: "
            + ", ".join(
                f"{k}={v:.4g}"
                for k, v in data["metrics"].items()
                if k in ("accuracy", "flops", "latency_ms", "peak_mem_mb")
            )
            + (f". It is {data['equivalent']}, so it runs as dense attention" if "equivalent" in data else "")
        )
        text = python_module(
            config, vocab_size=task.vocab_size, n_classes=task.n_classes, max_len=task.seq_len, header=header
        )
    else:
        text = export_text(row, outputs, rule, fmt=fmt)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path
