"""Metric names and directions, named once (log keys elsewhere are namespaced from these)."""

from __future__ import annotations

ACCURACY = "accuracy"
FLOPS = "flops"
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
    PARAMS: MINIMIZE,
    LATENCY_MS: MINIMIZE,
    PEAK_MEM_MB: MINIMIZE,
}
"""Metrics that can be objectives, with the direction that is better."""

COMPUTE_OBJECTIVES: dict[str, str] = {
    "flops": FLOPS,
    "latency": LATENCY_MS,
    "memory": PEAK_MEM_MB,
    "params": PARAMS,
}
"""``--compute`` choices and the metric each one minimises."""

# Trial states
COMPLETE = "complete"
PRUNED = "pruned"
FAILED = "failed"
