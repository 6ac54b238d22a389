"""FlexAttention's tile size against sparse patterns' own block sizes, on CUDA (FlexAttention has
no CPU backward, so this script needs a GPU).

For BigBird (block 64), Longformer and a sliding window at L=8192 (causal, 4 heads, head dim 64,
bf16), builds the pattern's ``BlockMask`` at ``BLOCK_SIZE`` 128 (FlexAttention's default), 64 and
the mixed (128, 64) / (64, 128), with the kernel's default tiles or ``BLOCK_M``/``BLOCK_N`` 64, and
times the compiled kernel forward and forward+backward against SDPA's dense causal kernel (CUDA
events, medians of 20). Prints one JSON line per variant: the fraction of the L x L grid the
pattern keeps, the fraction of tiles its BlockMask computes (partial tiles whole), the times and
the speedups, or the error a variant raised.

Usage (through ``../shared/gpu/``)::

    python3 benchmarks/flex_block_sizes.py [BATCH]

Measured on an H200 with torch 2.11+cu130 (``benchmarks/results/gpu_h200_2026-12-04.txt``): every
64-sized variant failed to compile; BigBird with blocks of 64 computes 12.1% of the 128-tiles for
5.0% of the grid's entries (2.4x), with blocks of 128 10.4% for 9.7% (1.08x).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from attn_search.engine.patterns import pattern_mask

L, H, D = 8192, 4, 64
PATTERNS: list[tuple[str, dict[str, Any]]] = [
    ("bigbird", {"block_size": 64, "n_global": 2, "n_random": 3}),
    ("bigbird", {"block_size": 128, "n_global": 2, "n_random": 3}),
    ("longformer", {"window": 256, "n_global": 16}),
    ("window", {"window": 256}),
]
VARIANTS: list[tuple[Any, dict[str, int] | None]] = [
    (128, None),
    (64, None),
    (64, {"BLOCK_M": 64, "BLOCK_N": 64}),
    ((128, 64), None),
    ((64, 128), None),
]


def median_ms(fn: Callable[[], None], n: int = 20) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(n):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if not torch.cuda.is_available():
        raise SystemExit("flex_block_sizes.py needs CUDA (FlexAttention has no CPU backward)")
    batch = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    torch.manual_seed(0)
    q, k, v = (torch.randn(batch, H, L, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    grad = torch.randn(batch, H, L, D, device="cuda", dtype=torch.bfloat16)
    flex = torch.compile(flex_attention, dynamic=False)

    def train(f: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            f().backward(grad)
            for t in (q, k, v):
                t.grad = None

        return run

    def dense() -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    base = (median_ms(lambda: dense().detach()), median_ms(train(dense)))
    print(json.dumps({"batch": batch, "dense_ms": base}), flush=True)
    for pattern, params in PATTERNS:
        mask = pattern_mask(pattern, L, causal=True, **params).cuda()
        flat = mask.reshape(-1)
        kept = float(mask.sum()) / (L * L)  # (over the whole grid, as BlockMask.sparsity counts tiles)
        for size, options in VARIANTS:
            name = f"{pattern}{params} BLOCK_SIZE={size} kernel={options}"
            try:
                t0 = time.time()
                block_mask = create_block_mask(lambda b, h, qi, ki: flat[qi * L + ki], None, None, L, L,
                                               device="cuda", BLOCK_SIZE=size)  # fmt: skip

                def f(bm: Any = block_mask, opts: Any = options) -> torch.Tensor:
                    return flex(q, k, v, block_mask=bm, kernel_options=opts)

                fwd, both = median_ms(lambda: f().detach()), median_ms(train(f))
                print(json.dumps({"variant": name, "kept": round(kept, 4),
                                  "tiles_kept": round(1 - block_mask.sparsity() / 100, 4),
                                  "fwd_ms": round(fwd, 3), "fwdbwd_ms": round(both, 3),
                                  "speedup_fwd": round(base[0] / fwd, 2), "speedup_fwdbwd": round(base[1] / both, 2),
                                  "s": round(time.time() - t0, 1)}), flush=True)  # fmt: skip
            except Exception as exc:  # (a variant the kernels reject: report it, go on)
                print(json.dumps({"variant": name, "error": f"{type(exc).__name__}: {exc}"[:400]}), flush=True)


if __name__ == "__main__":
    main()
