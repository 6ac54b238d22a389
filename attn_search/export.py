"""Export the chosen configuration to training code.

``yaml``/``json``: the config with its metrics and provenance (``attn_search.load_config`` reads
it back). ``python``: one module that needs only torch: :mod:`attn_search.engine.plain` (one
attention model, no member axis, one path per device) verbatim, then the searched pattern's rule
(its declared builder's source and what that calls, from :mod:`attn_search.engine.patterns`) and
configuration. It defines ``SearchedAttention(d_model, n_heads)``, a drop-in self-attention layer
``(B, L, d_model) -> (B, L, d_model)``, ``build_model()`` and ``load_searched(model,
state_dict)`` for weights trained by attn_search. Attention skips what the pattern skips
(FlexAttention's BlockMask on CUDA, the pattern's tiles on CPU), so a user's model saves the compute
the search counted. Pattern parameters are absolute positions (a window of 46 keys stays 46 at any
sequence length).
"""

from __future__ import annotations

import ast
import inspect
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from attn_search.engine import plain
from attn_search.engine.config import AttentionConfig
from attn_search.engine.patterns import DECLARED, resolve_params
from attn_search.engine.tasks import make_task
from attn_search.report.outputs import RunOutputs, export_dict, export_text, load_run, rebuild, select_row

FORMATS = ("yaml", "json", "python")


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
        elif isinstance(node, ast.Import | ast.ImportFrom):
            drop.update(span)
            if not (isinstance(node, ast.ImportFrom) and (node.module or "").startswith(("attn_search", "__future__"))):
                imports.append("\n".join(lines[n] for n in span))
    body = "\n".join(line for n, line in enumerate(lines) if n not in drop).strip()
    return imports, body + "\n"


def _names(code: Any) -> set[str]:
    """Global names a code object and the functions nested in it read."""
    out = set(code.co_names)
    for const in code.co_consts:
        if inspect.iscode(const):
            out |= _names(const)
    return out


def rule_source(builder: Callable[..., Any]) -> str:
    """The source of a pattern's rule builder and of every function of its module it calls (first
    what it calls), so the export carries the very rule the search used."""
    if builder.__name__ == "<lambda>" or "<locals>" in builder.__qualname__:
        raise ValueError(f"the rule builder {builder.__qualname__!r} is not a module-level function: declare the "
                         "pattern with a named function (def) so that the Python export can copy its source")  # fmt: skip
    done: list[Callable[..., Any]] = []

    def visit(fn: Callable[..., Any]) -> None:
        if fn in done:
            return
        for name in sorted(_names(fn.__code__)):
            called = fn.__globals__.get(name)
            if inspect.isfunction(called) and called.__module__ == fn.__module__:
                visit(called)
        done.append(fn)

    visit(builder)
    return "\n\n\n".join(_first_paragraph(inspect.getsource(fn).rstrip()) for fn in done)


def _first_paragraph(source: str) -> str:
    """A function's source with its docstring cut to the first paragraph (the rest is in
    attn_search/engine/patterns.py), so the export stays short."""
    fn = ast.parse(source).body[0]
    doc = ast.get_docstring(fn) if isinstance(fn, ast.FunctionDef) else None  # type: ignore[arg-type]
    if not doc or "\n\n" not in doc:
        return source
    node = fn.body[0]  # type: ignore[attr-defined]
    lines = source.splitlines()
    indent = " " * node.col_offset
    para = doc.split("\n\n")[0].splitlines()
    short = [f'{indent}"""{para[0]}', *(f"{indent}{line}" for line in para[1:])]
    short[-1] += '"""'
    return "\n".join([*lines[: node.lineno - 1], *short, *lines[node.end_lineno :]])


def python_module(config: AttentionConfig, *, vocab_size: int, n_classes: int, max_len: int, header: str = "") -> str:
    """Source of the self-contained torch module for ``config``: :mod:`attn_search.engine.plain`
    (one model, no member axis) with the searched pattern's rule and configuration appended."""
    params = resolve_params(config.pattern, **config.pattern_params())
    builder = DECLARED[config.pattern].rule
    imports, body = _split_module(plain)
    shown = ", ".join(f"{k}={v}" for k, v in params.items()) or "none"
    return f'''"""Attention layer and model exported by attn_search. Needs only torch.

{header}
Configuration: {config.describe()}, causal={config.causal}; pattern parameters ({shown}) are
absolute positions, the same at any sequence length.

``SearchedAttention(d_model, n_heads)`` is a drop-in self-attention layer, (B, L, d_model) in and
out, with this pattern; ``build_model()`` returns the searched model, and
``load_searched(model, state_dict)`` loads weights trained by attn_search into it. Attention runs
on the path that skips what the pattern skips: FlexAttention with its BlockMask on CUDA, the
pattern's tiles on CPU (SDPA over the pattern's mask where the tiles would cover most of the tile grid),
SDPA's fused kernel where the mask keeps every entry.
"""

from __future__ import annotations

{chr(10).join(imports)}

{body}

# {"-" * 30} the searched configuration {"-" * 30}
CONFIG = {config.to_dict()!r}
PATTERN = {config.pattern!r}
PARAMS = {params!r}
CAUSAL = {config.causal!r}
VOCAB_SIZE = {vocab_size}
N_CLASSES = {n_classes}
MAX_LEN = {max_len}  # the length searched (rotary positions set no limit)


{rule_source(builder)}


def pattern_rule(seq_len: int, device: torch.device) -> Rule:
    """The searched pattern's rule for sequences of ``seq_len``."""
    rule = {builder.__name__}(seq_len=seq_len, device=device, causal=CAUSAL, **PARAMS)
    return (lambda q, kv: rule(q, kv) & (kv <= q)) if CAUSAL else rule


class SearchedAttention(PatternAttention):
    """Self-attention with the searched pattern: ``(B, L, d_model) -> (B, L, d_model)``."""

    def __init__(self, d_model: int = CONFIG["d_model"], n_heads: int = CONFIG["n_heads"], *,
                 dropout: float = CONFIG["dropout"], attn_dropout: float = CONFIG["attn_dropout"]) -> None:
        super().__init__(d_model, n_heads, pattern_rule, dropout=dropout, attn_dropout=attn_dropout)


def build_model() -> PatternModel:
    """The searched model, untrained (``load_searched(model, state_dict)`` to reuse its weights)."""
    return PatternModel(vocab_size=VOCAB_SIZE, n_classes=N_CLASSES, d_model=CONFIG["d_model"],
                        n_heads=CONFIG["n_heads"], n_layers=CONFIG["n_layers"], rule_of=pattern_rule,
                        dropout=CONFIG["dropout"], attn_dropout=CONFIG["attn_dropout"])
'''


def export_run(
    run_dir: str | Path, *, fmt: str = "yaml", select: str | None = None, out: str | Path | None = None
) -> Path:
    """Export the configuration ``select`` picks from ``run_dir``; returns the written file."""
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r} is unknown: use one of {', '.join(FORMATS)}")
    study, space, record = load_run(run_dir)
    if select is not None and select != record.select:
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
                if k in ("accuracy", "flops", "attn_flops", "attn_tile_flops", "latency_ms", "peak_mem_mb")
            )
            + (f". It is {data['equivalent']}, so it runs as dense attention" if "equivalent" in data else "")
            + (f". Caveat: {data['caveat']}" if "caveat" in data else "")
        )
        text = python_module(
            config, vocab_size=task.vocab_size, n_classes=task.n_classes, max_len=task.seq_len, header=header
        )
    else:
        text = export_text(row, outputs, rule, fmt=fmt)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path
