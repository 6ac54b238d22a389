"""Metric names and directions, named once (log keys elsewhere are namespaced from these)."""

from __future__ import annotations

ACCURACY = "accuracy"
FLOPS = "flops"
ATTN_FLOPS = "attn_flops"
"""Forward FLOPs of the attention products alone (``Q K^T`` and ``P V``, every layer): the part of
``flops`` a sparsity pattern changes. The rest of ``flops`` (projections, MLP, classifier) is the
same for every configuration of a space with fixed width and depth, so the two rank a front alike,
but this one shows what a pattern saves and carries over to a wider model: its ratio between two
patterns does not depend on ``d_model``."""
ATTN_TILE_FLOPS = "attn_tile_flops"
"""Forward FLOPs of the same products over the tiles a block-sparse kernel computes: every
128 x 128 tile holding a kept entry, whole (FlexAttention's, the exported layer's CUDA path). On a
GPU a pattern costs its tiles, not its entries: BigBird with blocks of 64 keeps half the entries
of blocks of 128 but touches more tiles, and trained 1.4x slower on an H200
(``benchmarks/results/gpu_h200_2026-12-04.txt``). Counting it ranks a front as FlexAttention runs
it; at a length of one tile or less every pattern costs dense's."""
PARAMS = "params"
LATENCY_MS = "latency_ms"
PEAK_MEM_MB = "peak_mem_mb"
LATENCY_SPREAD = "latency_spread"
"""The slowest of a latency measurement's timed runs over the fastest: near 1 on a quiet machine;
well above it when something else loaded the machine while the trial was timed."""
LATENCY_SPREAD_WARN = 2.0
"""A spread above this is reported (console, report): that trial's latency is not trustworthy."""
TRAIN_SECONDS = "train_seconds"
EVAL_SECONDS = "eval_seconds"
MEASURE_SECONDS = "measure_seconds"
WALL_SECONDS = "wall_seconds"
FINAL_LOSS = "final_loss"
STEPS = "steps"

MAXIMIZE = "maximize"
MINIMIZE = "minimize"

DIRECTIONS: dict[str, str] = {
    ACCURACY: MAXIMIZE,
    FLOPS: MINIMIZE,
    ATTN_FLOPS: MINIMIZE,
    ATTN_TILE_FLOPS: MINIMIZE,
    PARAMS: MINIMIZE,
    LATENCY_MS: MINIMIZE,
    PEAK_MEM_MB: MINIMIZE,
}
"""Metrics that can be objectives, with the direction that is better."""

COMPUTE_OBJECTIVES: dict[str, str] = {
    "flops": FLOPS,
    "attn_flops": ATTN_FLOPS,
    "attn_tile_flops": ATTN_TILE_FLOPS,
    "latency": LATENCY_MS,
    "memory": PEAK_MEM_MB,
    "params": PARAMS,
}
"""``--compute`` choices and the metric each one minimises."""

ANALYTIC = (FLOPS, ATTN_FLOPS, ATTN_TILE_FLOPS)
"""Compute metrics counted from the configuration alone (no measurement): a range over the space is
known before any trial."""

ENTRY_COUNTED = (FLOPS, ATTN_FLOPS)
"""Analytic metrics that count the entries a pattern keeps: an agent trained against one serves
the other where width and depth are fixed (they differ by a constant there, which a normalised
range removes); ``attn_tile_flops`` ranks configurations otherwise."""


def compute_choice(metric: str) -> str:
    """The ``--compute`` choice that minimises ``metric`` (``flops``, ``attn_flops``, ``latency``...)."""
    return {m: c for c, m in COMPUTE_OBJECTIVES.items()}[metric]


# Trial states
COMPLETE = "complete"
PRUNED = "pruned"
FAILED = "failed"
