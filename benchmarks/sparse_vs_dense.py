"""Sparse attention kernels against the fastest dense path PyTorch offers.

For each sequence length and pattern (all causal) it prints:

* ``flop_ratio``: attention FLOPs of dense causal attention over the pattern's (kept entries only);
* ``blocked_train_speedup``: forward+backward time of causal ``scaled_dot_product_attention``
  (``is_causal=True``, PyTorch's flash kernel) over the ``blocked`` kernel's;
* ``flex_fwd_speedup``: forward time of the same SDPA over compiled ``flex`` (CPU: forward only);
* peak memory of one forward+backward (``attn_search.engine.cost.peak_memory_mb``) for blocked
  window(256), causal SDPA (a flash kernel, linear memory on CPU too) and dense attention with
  materialised scores (``softmax(Q K^T) V``, quadratic), and how each grows from the shortest to
  the longest length.

Every ratio is measured in the same run, timings interleaved and reported as medians. The last
line is one JSON object. Usage::

    python benchmarks/sparse_vs_dense.py                  # the issue's grid (about 5 minutes on 2 cores)
    python benchmarks/sparse_vs_dense.py --no-flex --lengths 1024 2048
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from attn_search import sparse_attention
from attn_search.engine.attention import layout_for
from attn_search.engine.cost import peak_memory_mb
from attn_search.engine.patterns import pattern_entries

PATTERNS: dict[str, dict[str, Any]] = {
    "window(256)": {"pattern": "window", "window": 256},
    # BigBird's published setting: 64-token blocks, 3 sliding, 2 global and 3 random blocks.
    "bigbird": {"pattern": "bigbird", "block_size": 64, "n_global": 2, "n_random": 3},
    "longformer": {"pattern": "longformer", "window": 256, "n_global": 16},
}


def median_times(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median seconds of each function, runs interleaved so drift hits all alike. On CUDA the clock is
    read after the device finished (kernels run asynchronously: without the synchronisation a timing
    is the launch's, and the kernel with the most Python in front of it looks the slowest)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for fn in fns.values():
        fn()  # warm-up (layouts, compiled kernels)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-flex", action="store_true", help="skip compiled FlexAttention (slow to compile on CPU)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    print(f"device={device} threads={torch.get_num_threads()} B={args.batch} H={args.heads} D={args.head_dim}")
    header = f"{'L':>5} {'pattern':<12} {'flop_ratio':>10} {'blocked_fwd_bwd':>16} {'flex_fwd':>9} {'tiles':>6}"
    print(header)
    print("-" * len(header))
    results: dict[str, Any] = {"device": str(device), "shape": [args.batch, args.heads, None, args.head_dim]}
    mem: dict[str, dict[int, float]] = {"blocked_window256": {}, "sdpa_causal": {}, "dense_math": {}}
    for L in args.lengths:
        shape = (args.batch, args.heads, L, args.head_dim)
        q, k, v = (torch.randn(shape, device=device, requires_grad=True) for _ in range(3))
        grad = torch.randn(shape, device=device)

        def train_step(fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
            def run() -> None:
                q.grad = k.grad = v.grad = None
                fn().backward(grad)

            return run

        def sdpa() -> torch.Tensor:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

        dense_entries = L * (L + 1) // 2
        train_fns: dict[str, Callable[[], None]] = {"sdpa": train_step(sdpa)}
        fwd_fns: dict[str, Callable[[], Any]] = {}
        for name, spec in PATTERNS.items():
            params = {k2: v2 for k2, v2 in spec.items() if k2 != "pattern"}

            def blocked(spec: dict[str, Any] = spec) -> torch.Tensor:
                return sparse_attention(q, k, v, causal=True, kernel="blocked", **spec)

            train_fns[name] = train_step(blocked)
            if not args.no_flex:

                def flex(spec: dict[str, Any] = spec) -> torch.Tensor:
                    with torch.no_grad():
                        return sparse_attention(q, k, v, causal=True, kernel="flex", **spec)

                fwd_fns[name] = flex
            results.setdefault(name, {})[L] = {
                "flop_ratio": dense_entries / pattern_entries(spec["pattern"], L, causal=True, **params),
                "tile_density": layout_for(spec["pattern"], L, causal=True, **params).tile_density,
            }
        train_t = median_times(train_fns, args.repeats)
        if fwd_fns:

            def sdpa_fwd() -> None:
                with torch.no_grad():
                    sdpa()

            fwd_t = median_times({"sdpa": sdpa_fwd, **fwd_fns}, args.repeats)
        for name in PATTERNS:
            row = results[name][L]
            row["blocked_train_speedup"] = train_t["sdpa"] / train_t[name]
            row["blocked_train_ms"] = 1e3 * train_t[name]
            row["sdpa_train_ms"] = 1e3 * train_t["sdpa"]
            row["flex_fwd_speedup"] = fwd_t["sdpa"] / fwd_t[name] if fwd_fns else None
            flex_txt = f"{row['flex_fwd_speedup']:.2f}x" if fwd_fns else "-"
            print(
                f"{L:>5} {name:<12} {row['flop_ratio']:>10.2f} {row['blocked_train_speedup']:>15.2f}x "
                f"{flex_txt:>9} {row['tile_density']:>6.3f}"
            )

        mask = torch.ones(L, L, dtype=torch.bool, device=device).tril()

        def dense_math() -> torch.Tensor:  # softmax(Q K^T) V with the scores materialised
            s = (q @ k.transpose(-1, -2)) / args.head_dim**0.5
            return s.masked_fill(~mask, float("-inf")).softmax(-1) @ v

        for key, fn in (
            ("blocked_window256", train_fns["window(256)"]),
            ("sdpa_causal", train_fns["sdpa"]),
            ("dense_math", train_step(dense_math)),
        ):
            fn()
            mem[key][L] = peak_memory_mb(fn, device=device)[1]
    lo, hi = min(args.lengths), max(args.lengths)
    print(f"\npeak memory of one forward+backward (MiB), growth from L={lo} to L={hi}:")
    growth = {}
    for key, by_len in mem.items():
        growth[key] = by_len[hi] / by_len[lo] if by_len[lo] > 0 else None
        cells = "  ".join(f"L={L}: {by_len[L]:7.1f}" for L in args.lengths)
        print(f"  {key:<24} {cells}   growth x{growth[key]:.1f}" if growth[key] else f"  {key:<24} {cells}")
    results["memory_mb"] = {key: {str(L): v for L, v in by_len.items()} for key, by_len in mem.items()}
    results["memory_growth"] = growth
    target = results["window(256)"][hi]
    print(
        f"\nwindow(256) at L={hi}: training speedup {target['blocked_train_speedup']:.2f}x vs FLOP ratio "
        f"{target['flop_ratio']:.2f} (target: at least half, {target['flop_ratio'] / 2:.2f}x)"
    )
    print(json.dumps({k: ({str(L): r for L, r in v.items()} if k in PATTERNS else v) for k, v in results.items()}))


if __name__ == "__main__":
    main()
