"""Per-step overhead of the attention call: a model that keeps its attention plan (parameters
resolved, kernel chosen, mask/layout/BlockMask and rotary tables built once per length, device
and mode: ``attention_plan``) against the same model re-planning at every call, as every call did
before plans were kept.

Small models are where it shows: at a few hundred microseconds a step, resolving and looking up
per call is a visible share. Prints milliseconds per training step for both and their ratio,
per pattern; the last line is one JSON object.

Usage::

    python benchmarks/step_overhead.py [--device auto|cpu|cuda] [--steps 200]
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch

from attn_search import PATTERNS, AttentionConfig, build_model, make_task
from attn_search.engine.model import SparseSelfAttention, loss_fn
from attn_search.engine.trainer import resolve_device

PARAMS = {"window": 8, "dilation": 2, "stride": 8, "block_size": 8, "n_global": 1, "n_random": 1}


def ms_per_step(config: AttentionConfig, device: torch.device, steps: int, *, keep_plans: bool) -> float:
    task = make_task("mqar", seq_len=64, n_pairs=8, n_keys=16, n_values=8)
    torch.manual_seed(0)
    model = build_model(config, task).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = (t.to(device) for t in task.data("train", config.batch_size))
    attn = [m for m in model.modules() if isinstance(m, SparseSelfAttention)]

    def step() -> None:
        if not keep_plans:
            for m in attn:
                m._plans.clear()  # re-plan at every call: what each call did before plans were kept
        loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    for _ in range(10):  # warm-up (compiles, caches)
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; the best of each side counts")
    args = parser.parse_args()
    device = resolve_device(args.device)
    rows: dict[str, Any] = {}
    print(f"training step of a d_model=32, L=64, batch 8 model on {device}: ms per step")
    for pattern in PATTERNS:
        config = AttentionConfig(d_model=32, n_heads=2, pattern=pattern, batch_size=8, **PARAMS)  # type: ignore[arg-type]
        # best of alternating rounds: both sides see the same machine noise
        replan = kept = float("inf")
        for _ in range(args.rounds):
            replan = min(replan, ms_per_step(config, device, args.steps, keep_plans=False))
            kept = min(kept, ms_per_step(config, device, args.steps, keep_plans=True))
        rows[pattern] = {"replan_ms": replan, "plan_kept_ms": kept, "speedup": replan / kept}
        print(f"  {pattern:<11} re-planned {replan:7.3f}  plan kept {kept:7.3f}  speedup {replan / kept:5.2f}x")
    print(json.dumps({"device": str(device), "steps": args.steps, "patterns": rows}))


if __name__ == "__main__":
    main()
