"""Export the chosen configuration to training code.

``yaml``/``json``: the config with its metrics and provenance (``attn_search.load_config`` reads
it back). ``python``: one self-contained module that needs only torch. It defines
``SparseSelfAttention(d_model, n_heads)``, a drop-in layer ``(B, L, d_model) -> (B, L, d_model)``
with the chosen pattern and its parameters as defaults, and ``build_model()`` returning the whole
small model with the same parameter names as :func:`attn_search.build_model`, so trained weights
load into it. The generated attention is the dense masked ``scaled_dot_product_attention`` path
(the ``reference`` backend): simple and portable; attn_search's block-sparse kernels are for
training speed, not for a file a user copies into their code.
"""

from __future__ import annotations

import inspect
import textwrap
from pathlib import Path
from typing import Any

from attn_search.engine.config import AttentionConfig
from attn_search.engine.model import apply_rotary, rotary_tables
from attn_search.engine.patterns import PATTERN_PARAMS, bigbird_block_table
from attn_search.engine.tasks import make_task
from attn_search.outputs import RunOutputs, export_dict, export_text, load_run, select_row, trials_frame

FORMATS = ("yaml", "json", "python")

_RULES = {
    "dense": "torch.ones_like(q - kv, dtype=torch.bool)",
    "window": "(q - kv).abs() < window",
    "dilated": "((q - kv).abs() < window * dilation) & ((q - kv) % dilation == 0)",
    "strided": "((q - kv).abs() < stride) | ((q - kv) % stride == 0)",
    "bigbird": "_bigbird_table(seq_len)[q // block_size, kv // block_size]",
    "longformer": "((q - kv).abs() < window) | (q < n_global) | (kv < n_global)",
}


def python_module(config: AttentionConfig, *, vocab_size: int, n_classes: int, max_len: int, header: str = "") -> str:
    """Source of the self-contained torch module for ``config`` (see module docstring)."""
    params = {name: getattr(config, name) for name in PATTERN_PARAMS[config.pattern]}
    param_sig = "".join(f", {k}: int = {v}" for k, v in params.items())
    param_args = ", ".join(params)
    bigbird = ""
    if config.pattern == "bigbird":
        bigbird = inspect.getsource(bigbird_block_table) + textwrap.dedent(f"""

            @functools.lru_cache(maxsize=8)
            def _bigbird_table(seq_len: int) -> torch.Tensor:
                n_blocks = math.ceil(seq_len / {config.block_size})
                return bigbird_block_table(n_blocks, n_global={config.n_global}, n_random={config.n_random},
                                           seed={config.seed}, causal={config.causal})
            """)
    # the model's own rotary code, copied verbatim so the export cannot drift from it
    rotary = inspect.getsource(rotary_tables) + "\n\n" + inspect.getsource(apply_rotary) + "\n"
    return f'''"""Attention layer and model exported by attn_search. Needs only torch.

{header}
Configuration: {config.describe()}, causal={config.causal}.
``SparseSelfAttention(d_model, n_heads)`` is a drop-in self-attention layer, (B, L, d_model) in and
out, with the pattern below baked in; ``build_model()`` returns the searched model (token and
previous-token embeddings, {config.n_layers} pre-LayerNorm block(s) with rotary positions, a
per-position classifier) with attn_search's parameter names, so its state_dict loads here.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

CONFIG = {config.to_dict()!r}
VOCAB_SIZE = {vocab_size}
N_CLASSES = {n_classes}
MAX_LEN = {max_len}
PATTERN = {config.pattern!r}

{bigbird}

@functools.lru_cache(maxsize=8)
def pattern_mask(seq_len: int, causal: bool = {config.causal}{param_sig}, device: str = "cpu") -> torch.Tensor:
    """(L, L) bool mask of the {config.pattern} pattern: True where query i may attend key j."""
    q = torch.arange(seq_len, device=device)[:, None]
    kv = torch.arange(seq_len, device=device)[None, :]
    mask = {_RULES[config.pattern]}
    return mask & (kv <= q) if causal else mask


{rotary}
class SparseSelfAttention(nn.Module):
    """Multi-head self-attention restricted to the {config.pattern} pattern. (B, L, C) -> (B, L, C)."""

    def __init__(self, d_model: int = {config.d_model}, n_heads: int = {config.n_heads}, *, causal: bool = {config.causal},
                 attn_dropout: float = {config.attn_dropout}, dropout: float = {config.dropout}{param_sig}) -> None:
        super().__init__()
        assert d_model % n_heads == 0 and (d_model // n_heads) % 2 == 0, "n_heads must divide d_model into even heads"
        self.n_heads = n_heads
        self.causal = causal
        self.attn_dropout = attn_dropout
        self.pattern_params = dict({", ".join(f"{k}={k}" for k in params)})
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, L, self.n_heads, C // self.n_heads).transpose(1, 2) for t in (q, k, v))  # (B, nh, L, hs)
        cos, sin = rotary_tables(L, C // self.n_heads, device=x.device)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        mask = pattern_mask(L, self.causal, **self.pattern_params, device=str(x.device))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.attn_dropout if self.training else 0.0)
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(B, L, C)))


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = SparseSelfAttention(d_model, n_heads, dropout=dropout)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class AttentionModel(nn.Module):
    def __init__(self, vocab_size: int = VOCAB_SIZE, n_classes: int = N_CLASSES, d_model: int = {config.d_model},
                 n_layers: int = {config.n_layers}, n_heads: int = {config.n_heads}, dropout: float = {config.dropout}) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.prev_emb = nn.Embedding(vocab_size, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList([Block(d_model, n_heads, dropout) for _ in range(n_layers)])
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, n_classes)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        prev = F.pad(idx[:, :-1], (1, 0))
        x = self.drop(self.tok_emb(idx) + self.prev_emb(prev))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def build_model() -> AttentionModel:
    """The searched model, untrained (load a state_dict from attn_search.build_model to reuse weights)."""
    return AttentionModel()


__all__ = ["CONFIG", "PATTERN", "AttentionModel", "SparseSelfAttention", "build_model", "pattern_mask"]
# pattern parameters baked in as defaults: {param_args or "none"}
'''


def export_run(
    run_dir: str | Path, *, fmt: str = "yaml", select: str | None = None, out: str | Path | None = None
) -> Path:
    """Export the configuration ``select`` picks from ``run_dir``; returns the written file."""
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r} is unknown: use one of {', '.join(FORMATS)}")
    study, space, record = load_run(run_dir)
    outputs = RunOutputs.from_record(Path(run_dir), record, space, select=select)
    rule = outputs.select
    row = select_row(trials_frame(study), space, rule)
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
        )
        text = python_module(
            config, vocab_size=task.vocab_size, n_classes=task.n_classes, max_len=task.seq_len, header=header
        )
    else:
        text = export_text(row, outputs, rule, fmt=fmt)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path
