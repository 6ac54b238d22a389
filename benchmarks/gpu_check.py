"""One GPU check that fits a short loan of a GPU machine (under 8 minutes on an H100 or H200).

Prints one JSON line per section as it ends (so a run cut short keeps what it measured), then one
with all of them:

* ``pytest_gpu``: the ``gpu``-marked tests (``pytest -m gpu``): passed / failed counts;
* ``twin``: a K=32 population of sparse-space proposals (in eval mode, so no dropout draws differ) against each member's lone model, logits and gradients under bf16 autocast through
  the FlexAttention BlockMask path: the largest relative error (bf16 tolerance 2e-2);
* ``steps``: per population size K in 1, 8, 16, 32, 64 (proposals with the sparse space's
  attention dropout): the attention path the population took and its median step time in ms
  (CUDA events, warm), eager and captured as a CUDA graph (``graphed_step_ms``; what
  ``ATTN_SEARCH_CUDA_GRAPHS=1`` runs);
* ``throughput``: trials per hour one by one and in populations of 32 with median pruning
  (``benchmarks/gpu_throughput.py``), each with a cold and then a warm compile cache; the cold run's
  extra seconds are reported as compile seconds.

Usage (through ``../shared/gpu/``; see its README)::

    source .gpu/setup.sh; cd /tmp; python3 $OLDPWD/benchmarks/gpu_check.py
    python benchmarks/gpu_check.py --device cpu --quick        # the script's own check, on a CPU
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from attn_search.engine import trainer as T
from attn_search.engine.config import AttentionConfig
from attn_search.engine.member_layout import MemberPlan
from attn_search.engine.model import build_model, member_losses
from attn_search.engine.tasks import make_task
from attn_search.search.space import load_space

HERE = Path(__file__).resolve().parent


def proposals(n: int, seed: int, *, attn_dropout: bool) -> list[AttentionConfig]:
    """``n`` random configurations of the sparse space (numpy draws; no Optuna on the GPU image)."""
    space = load_space("sparse")
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        values: dict[str, Any] = {}
        for p in space.params:
            if not p.active(values):
                continue
            if p.kind == "categorical":
                values[p.name] = p.choices[int(rng.integers(len(p.choices)))]
                continue
            lo, hi, u = float(p.low), float(p.high), rng.random()  # type: ignore[arg-type]
            v = math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo))) if p.log else lo + u * (hi - lo)
            values[p.name] = round(v) if p.kind == "int" else v
        if not attn_dropout:
            values["attn_dropout"] = 0.0
        out.append(space.make_config(values, seed=len(out)))
    return out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12))


def twin(device: torch.device, k: int, seq_len: int) -> dict[str, Any]:
    configs = proposals(k, 1, attn_dropout=False)
    task = make_task("mqar", seq_len=seq_len, n_pairs=seq_len // 8)
    x, y = task.data("train", 4)
    x, y = x.to(device), y.to(device)
    fused = build_model(configs, task, heads=(2, 8)).to(device).eval()  # eval: no dropout draws, gradients on
    xs, ys = x.unsqueeze(0).expand(k, -1, -1), y.unsqueeze(0).expand(k, -1, -1)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        logits = fused(xs)
        member_losses(logits, ys, torch.zeros(k, device=device)).sum().backward()  # each member's own loss
    plan = next(iter(fused.blocks[0].attn._plans.values()))
    path = "flex" if isinstance(plan, MemberPlan) and plan.block_masks is not None else "per-member/dense"
    worst = {"logits": 0.0, "grads": 0.0}
    for m in (0, k // 2, k - 1):
        alone = build_model(configs[m], task).to(device).eval()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = alone(x)
            member_losses(out.unsqueeze(0), y.unsqueeze(0), 0.0).sum().backward()
        worst["logits"] = max(worst["logits"], rel(logits[m].detach(), out.detach()))
        for p_f, p_a in zip(fused.parameters(), alone.parameters(), strict=True):
            worst["grads"] = max(worst["grads"], rel(p_f.grad[m], p_a.grad[0]))  # type: ignore[index]
    return {"members": k, "path": path, **{f"max_rel_err_{n}": round(v, 5) for n, v in worst.items()},
            "ok": max(worst.values()) < 2e-2}  # fmt: skip


def step_times(device: torch.device, sizes: list[int], steps: int) -> dict[str, Any]:
    out = {}
    task = make_task("mqar")
    for k in sizes:
        configs = proposals(k, 2, attn_dropout=True)
        pop = T.Population(list(enumerate(configs)), task, T.PRESETS["default"], device, "auto", heads=(2, 8))
        for _ in range(3):  # warm: plans built, kernels compiled
            pop.train_step()
        times = []
        for _ in range(steps):
            started = pop.timer.start()
            pop.train_step()
            pop.timer.stop(started, 1.0)
            times.append(pop.timer.settle() * 1000)
        if not pop.model.member_axis:  # a population of one trains the plain model (attn_search.engine.single)
            path = "plain"
        else:
            plan = next(iter(pop.model.blocks[0].attn._plans.values()))
            path = ("flex" if isinstance(plan, MemberPlan) and plan.block_masks is not None else
                    "per-member" if isinstance(plan, list) or getattr(plan, "alone", None) else "dense")  # fmt: skip
        dropping = sum(c.attn_dropout > 0 for c in configs)
        out[str(k)] = {"step_ms": round(statistics.median(times), 3), "path": path, "with_attn_dropout": dropping,
                       "ms_per_member_step": round(statistics.median(times) / k, 4)}  # fmt: skip
        if device.type == "cuda" and k > 1:  # the same step captured as a CUDA graph (ATTN_SEARCH_CUDA_GRAPHS=1)
            graphed = T._GraphedStep(pop)
            for _ in range(graphed.WARMUP + 1):
                graphed()
            times = []
            for _ in range(steps):
                started = pop.timer.start()
                graphed()
                pop.timer.stop(started, 1.0)
                times.append(pop.timer.settle() * 1000)
            out[str(k)]["graphed_step_ms"] = round(statistics.median(times), 3)
        print(f"steps: K={k} {json.dumps(out[str(k)])}", file=sys.stderr, flush=True)  # (a run cut short keeps it)
        del pop
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def throughput(device: str, trials: int, steps: int) -> dict[str, Any]:
    """gpu_throughput's one-measurement mode with a cache dir shared by a cold and a warm run."""
    out: dict[str, Any] = {}
    for name, size in (("one_by_one", 0), ("population_32_pruned", 32)):
        with tempfile.TemporaryDirectory() as cache:
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "TRITON_CACHE_DIR": os.path.join(cache, "triton")}
            runs = []
            for _ in ("cold", "warm"):
                cmd = [sys.executable, str(HERE / "gpu_throughput.py"), "--device", device, "--trials", str(trials),
                       "--steps", str(steps), "--one", str(size), "--prune"]  # fmt: skip
                done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=400, check=False)
                if done.returncode != 0:
                    runs.append({"error": done.stderr[-500:]})
                    break
                runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        entry: dict[str, Any] = {"cold": runs[0]}
        if len(runs) > 1:
            entry["warm"] = runs[1]
            entry["compile_s"] = round(runs[0]["seconds"] - runs[1]["seconds"], 1)
        out[name] = entry
    with contextlib.suppress(KeyError):  # (a failed run has no warm figures)
        out["speedup_warm"] = round(out["population_32_pruned"]["warm"]["trials_per_hour"]
                                    / out["one_by_one"]["warm"]["trials_per_hour"], 2)  # fmt: skip
    return out


def pytest_gpu(timeout: int) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", str(HERE.parent / "tests"), "-x",
                           "-p", "no:cacheprovider"], capture_output=True, text=True, timeout=timeout, check=False)  # fmt: skip
    tail = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-300:]
    return {"returncode": done.returncode, "summary": tail}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=("cpu", "cuda"))
    parser.add_argument("--quick", action="store_true", help="small sizes: check the script itself (CPU)")
    parser.add_argument("--skip", nargs="*", default=[], choices=("pytest", "twin", "steps", "throughput"))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    device = torch.device(args.device)
    start = time.perf_counter()
    result: dict[str, Any] = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                              "torch": torch.__version__}  # fmt: skip
    sizes = [1, 2, 4] if args.quick else [1, 8, 16, 32, 64]
    sections = {
        "pytest_gpu": lambda: pytest_gpu(150),
        "twin": lambda: twin(device, 4 if args.quick else 32, 64 if args.quick else 256),
        "steps": lambda: step_times(device, sizes, 3 if args.quick else 20),
        "throughput": lambda: throughput(args.device, 4 if args.quick else 64, 8 if args.quick else 300),
    }
    for name, fn in sections.items():
        if name.split("_")[0] in args.skip:
            continue
        t0 = time.perf_counter()
        try:
            result[name] = fn()
        except Exception as exc:  # one failing section must not lose the others' figures
            result[name] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        result.setdefault("seconds", {})[name] = round(time.perf_counter() - t0, 1)
        print(json.dumps({name: result[name], "seconds": result["seconds"][name]}), flush=True)  # (if cut short)
    result["total_s"] = round(time.perf_counter() - start, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
