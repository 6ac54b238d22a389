"""Does the exported layer save the compute the search counted?

Writes the exported Python module (``attn-search export --format python``, here through
:func:`attn_search.export.python_module`) for each pattern, loads it as a user would, and times
``SearchedAttention`` (the drop-in layer) forward and forward+backward at a long length against
the same layer exported for dense attention (PyTorch's ``scaled_dot_product_attention``). Prints
the FLOP ratios (attention FLOPs of dense over the pattern's: ``attn_flops``, its kept entries, and
``attn_tile_flops``, the 128-tiles FlexAttention computes), the speedups, and the
path the layer ran on (``tiles`` on CPU, ``flex`` on CUDA, ``dense``: SDPA). Timings interleaved, medians; the last line is one JSON object.

Usage::

    python benchmarks/export_speed.py                       # L=4096, d_model 256, 4 heads, on CPU
    python benchmarks/export_speed.py --device cuda --seq-len 8192
    python benchmarks/export_speed.py --device cuda --seq-len 8192 --dtype bf16   # under bf16 autocast
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import sys
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from attn_search import AttentionConfig
from attn_search.engine.patterns import pattern_entries, pattern_tile_entries
from attn_search.export import python_module

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sparse_vs_dense import median_times

PATTERNS: dict[str, dict[str, Any]] = {
    "window(46)": {"pattern": "window", "window": 46},
    "window(256)": {"pattern": "window", "window": 256},
    "bigbird": {"pattern": "bigbird", "block_size": 64, "n_global": 2, "n_random": 3},
    "longformer": {"pattern": "longformer", "window": 256, "n_global": 16},
}


def load_export(config: AttentionConfig, folder: Path, name: str, seq_len: int) -> ModuleType:
    path = folder / f"{name}.py"
    path.write_text(python_module(config, vocab_size=16, n_classes=4, max_len=seq_len))
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--dtype",
        choices=("fp32", "bf16"),
        default="fp32",
        help="bf16: under bf16 autocast, as the search trains on CUDA (not yet measured on a GPU)",
    )
    args = parser.parse_args()
    L, dev, dtype = args.seq_len, torch.device(args.device), args.dtype
    cast = (lambda: torch.autocast(dev.type, dtype=torch.bfloat16)) if dtype == "bf16" else contextlib.nullcontext
    x = torch.randn(args.batch, L, args.d_model, device=dev)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        layers = {}
        for name, params in {"dense": {"pattern": "dense"}, **PATTERNS}.items():  # (dense: SDPA's fused kernel)
            config = AttentionConfig(d_model=args.d_model, n_heads=args.heads, causal=True, **params)
            module = load_export(config, Path(tmp), f"export_{len(layers)}", L)
            layers[name] = (config, module.SearchedAttention().to(dev))

        def forward(layer: torch.nn.Module) -> Any:
            def run() -> None:
                with torch.no_grad(), cast():
                    layer(x)

            return run

        def train(layer: torch.nn.Module) -> Any:
            def run() -> None:
                with cast():
                    out = layer(x)
                out.float().sum().backward()

            return run

        fwd = median_times({n: forward(m) for n, (_, m) in layers.items()}, args.repeats)
        bwd = median_times({n: train(m) for n, (_, m) in layers.items()}, args.repeats)
    dense_entries = pattern_entries("dense", L, causal=True)
    dense_tiles = pattern_tile_entries("dense", L, causal=True)
    print(f"exported SearchedAttention at L={L}, d_model {args.d_model}, {args.heads} heads, batch {args.batch}, "
          f"on {dev.type} ({dtype}): speedup over the dense export")  # fmt: skip
    print(f"{'pattern':<12} {'flop_ratio':>10} {'tile_ratio':>10} {'fwd_ms':>8} {'fwd_x':>6} {'train_ms':>9} "
          f"{'train_x':>7}  kernel")  # fmt: skip
    for name, (config, _) in layers.items():
        ratio = dense_entries / pattern_entries(config.pattern, L, causal=True, **config.pattern_params())
        tile_ratio = dense_tiles / pattern_tile_entries(config.pattern, L, causal=True, **config.pattern_params())
        kernel = layers[name][1]._plans[L, x.device][2][0]  # the path the layer took: tiles, flex or dense
        row = {"flop_ratio": ratio, "tile_ratio": tile_ratio, "forward_ms": fwd[name] * 1e3, "forward_speedup": fwd["dense"] / fwd[name],
               "train_ms": bwd[name] * 1e3, "train_speedup": bwd["dense"] / bwd[name], "kernel": kernel}  # fmt: skip
        results[name] = row
        print(f"{name:<12} {ratio:>10.1f} {tile_ratio:>10.1f} {row['forward_ms']:>8.1f} {row['forward_speedup']:>6.2f} "
              f"{row['train_ms']:>9.1f} {row['train_speedup']:>7.2f}  {kernel}")  # fmt: skip
    print(json.dumps({"seq_len": L, "device": dev.type, "dtype": dtype, "batch": args.batch, "results": results}))


if __name__ == "__main__":
    main()
