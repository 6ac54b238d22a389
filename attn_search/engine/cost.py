"""Compute figures of a configuration, measured honestly.

* :func:`model_flops` — analytic forward FLOPs per sequence (a multiply-add counts 2), counting
  only the attention entries the pattern keeps::

      flops = n_layers * (24 * L * d^2 + 4 * E * d) + 2 * L * d * C

  with ``L`` the sequence length, ``d`` = ``d_model``, ``C`` the number of classes and ``E`` the
  (query, key) pairs the pattern keeps (:func:`~attn_search.engine.patterns.pattern_entries`, per head).
  ``24 L d^2`` is the QKV (6), output (2) and MLP (16) projections; ``4 E d`` is ``Q K^T`` and
  ``P V`` summed over heads. Embeddings, LayerNorm, softmax and GELU are not counted (as
  ``torch.utils.flop_counter`` does not count them either). Checked against ``FlopCounterMode``
  on the dense path in tests.
* :func:`model_attention_flops` — the ``4 E d`` term alone, every layer (the ``attn_flops``
  metric): what the pattern changes. The sparse space counts compute this way, since its width and
  depth are fixed and ``flops`` would add the same projections to every configuration.
* :func:`model_attention_tile_flops` — the same products over the tiles a block-sparse kernel
  computes (:func:`~attn_search.engine.patterns.pattern_tile_entries`: FlexAttention's 128 x 128
  tiles, the exported layer's CUDA path), the ``attn_tile_flops`` metric: a tile with one kept
  entry costs a whole tile there, so this ranks patterns as a GPU runs them (BigBird with blocks of
  64 above blocks of 128) where ``attn_flops`` counts only what they keep.
* :func:`measure_latency` — median wall time of forward passes after warm-up, and their spread.
* :func:`peak_memory_mb` — peak memory a callable adds: on CUDA, ``max_memory_allocated`` above
  the memory allocated before; on Linux CPUs, the growth of the process's peak resident set
  (``VmHWM``, reset through ``/proc/self/clear_refs``) above its resident set before the call,
  after ``malloc_trim`` has handed freed heap pages back so that reused pages are not missed;
  ``nan`` where neither is available. A trial's ``peak_mem_mb`` adds the training state
  (parameters, gradients, AdamW's two moments, from tensor sizes) to the measured peak of one
  training step, so the figure means the same on both devices.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import math
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

from attn_search.engine import metrics as M
from attn_search.engine.config import AttentionConfig
from attn_search.engine.patterns import pattern_entries, pattern_tile_entries

T = TypeVar("T")


def attention_flops(config: AttentionConfig, seq_len: int) -> int:
    """Forward FLOPs of ``Q K^T`` and ``P V`` in one layer, all heads, one sequence: ``4 E d``."""
    entries = pattern_entries(config.pattern, seq_len, causal=config.causal, **config.pattern_params())
    return 4 * entries * config.d_model


def model_flops(config: AttentionConfig, *, seq_len: int, n_classes: int) -> int:
    """Analytic forward FLOPs per sequence (see module docstring)."""
    d = config.d_model
    per_layer = 24 * seq_len * d * d + attention_flops(config, seq_len)
    return config.n_layers * per_layer + 2 * seq_len * d * n_classes


def model_attention_flops(config: AttentionConfig, *, seq_len: int) -> int:
    """Forward FLOPs of the attention products, every layer, one sequence (``n_layers * 4 E d``)."""
    return config.n_layers * attention_flops(config, seq_len)


def model_attention_tile_flops(config: AttentionConfig, *, seq_len: int) -> int:
    """Forward FLOPs of the attention products over the tiles a block-sparse kernel computes, every
    layer, one sequence (``n_layers * 4 T d``, ``T`` from :func:`pattern_tile_entries`)."""
    tiles = pattern_tile_entries(config.pattern, seq_len, causal=config.causal, **config.pattern_params())
    return config.n_layers * 4 * tiles * config.d_model


def analytic_compute(metric: str, config: AttentionConfig, *, seq_len: int, n_classes: int) -> float:
    """``metric`` (``flops``, ``attn_flops`` or ``attn_tile_flops``,
    :data:`~attn_search.engine.metrics.ANALYTIC`) of ``config`` at ``seq_len``."""
    if metric == M.FLOPS:
        return float(model_flops(config, seq_len=seq_len, n_classes=n_classes))
    if metric == M.ATTN_FLOPS:
        return float(model_attention_flops(config, seq_len=seq_len))
    if metric == M.ATTN_TILE_FLOPS:
        return float(model_attention_tile_flops(config, seq_len=seq_len))
    raise ValueError(f"{metric} is measured, not counted: analytic compute is flops, attn_flops or attn_tile_flops")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_latency(
    fn: Callable[[], Any], *, device: torch.device, warmup: int = 2, repeats: int = 5
) -> tuple[float, float]:
    """Median wall time in milliseconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs, and
    the spread of those runs (slowest over fastest; see ``metrics.LATENCY_SPREAD``)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times), max(times) / max(min(times), 1e-12)


def measure_latency_ms(fn: Callable[[], Any], *, device: torch.device, warmup: int = 2, repeats: int = 5) -> float:
    """Median wall time in milliseconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs."""
    return measure_latency(fn, device=device, warmup=warmup, repeats=repeats)[0]


_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kb(field: str) -> int:
    match = re.search(rf"{field}:\s+(\d+) kB", _STATUS.read_text())
    if match is None:
        raise OSError(f"{field} not in {_STATUS}")
    return int(match.group(1))


def _malloc_trim() -> None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        if libc is not None and hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)
    except OSError:
        pass


def training_state_mb(model: torch.nn.Module) -> float:
    """Parameters + gradients + AdamW's two moment buffers, in MiB."""
    return 4 * sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20


def peak_memory_mb(fn: Callable[[], T], *, device: torch.device) -> tuple[T, float]:
    """Run ``fn()``; return its result and the peak memory in MiB it added on ``device`` (see the
    module docstring for the measure)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        torch.cuda.synchronize(device)
        return result, (torch.cuda.max_memory_allocated(device) - before) / 2**20
    gc.collect()
    _malloc_trim()
    try:
        before = _status_kb("VmRSS")
        _CLEAR_REFS.write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    except OSError:
        return fn(), math.nan
    result = fn()
    return result, max(0, _status_kb("VmHWM") - before) / 1024
