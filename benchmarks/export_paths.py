"""Where the exported model's CPU path should switch from the pattern's tiles to SDPA over the mask.

Times one causal window attention forward+backward (batch x 2 heads x head dim 32) on the export's
two CPU paths, :class:`~attn_search.engine.plain.Tiles` and ``scaled_dot_product_attention`` with
the boolean mask, at several lengths and widths, and prints the tile grid's density (the fraction
computed, padding included) beside the ratio: below about 0.4 the tiles win, above it SDPA over the
mask does. :data:`attn_search.engine.plain.MAX_TILE_DENSITY` is set from this table.

Then the exported model (:class:`~attn_search.engine.plain.PatternModel`, what ``attn-search
export --format python`` writes and what a lone trial trains) against the member-axis model of one
configuration (the engine's own single-pattern kernels: what each member of a CPU population runs),
one training step's forward+backward per pattern, at L=64 (the recorded tables'), L=256 (the default
task's length) and L=1024:
above 1 the plain model is slower than the member model. Medians of 7 runs after 2 warm-ups, the
two models interleaved.

Usage::

    python benchmarks/export_paths.py
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from attn_search.engine.config import AttentionConfig
from attn_search.engine.model import build_model
from attn_search.engine.patterns import pattern_mask
from attn_search.engine.plain import MAX_TILE_DENSITY, PatternModel, Tiles
from attn_search.engine.single import rule_factory
from attn_search.engine.tasks import make_task

CONFIGS = {
    "window(8)": {"pattern": "window", "window": 8},
    "dilated(32,2)": {"pattern": "dilated", "window": 32, "dilation": 2},
    "bigbird(16,2,2)": {"pattern": "bigbird", "block_size": 16, "n_global": 2, "n_random": 2},
    "dense": {"pattern": "dense"},
}


def median_ms(fn: Callable[[], None], repeats: int = 7) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    print(f"tiles vs SDPA over the mask, forward+backward; MAX_TILE_DENSITY = {MAX_TILE_DENSITY}")
    print(f"{'L':>5} {'window':>6} {'density':>7} {'tiles_ms':>8} {'masked_ms':>9} {'tiles/masked':>12}")
    for seq_len, batch in ((256, 16), (512, 8), (1024, 4)):
        for window in (8, 32, 64, 128, 200):
            mask = pattern_mask("window", seq_len, causal=True, window=window)
            tiles = Tiles(mask)
            q, k, v = (torch.randn(batch, 2, seq_len, 32, requires_grad=True) for _ in range(3))
            a = median_ms(lambda: tiles(q, k, v, 0.17, 0.0).sum().backward())
            b = median_ms(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask).sum().backward())
            print(f"{seq_len:>5} {window:>6} {tiles.density:>7.2f} {a:>8.1f} {b:>9.1f} {a / b:>12.2f}")
    print("\nthe plain model (export, lone trial) against the member model of one configuration,")
    print("forward+backward of a training step")
    print(f"{'L':>5} {'batch':>5} {'pattern':<16} {'member_ms':>9} {'plain_ms':>9} {'plain/member':>13}")
    for seq_len, batch in ((64, 32), (256, 32), (1024, 8)):
        task = make_task("mqar", seq_len=seq_len, n_pairs=min(32, seq_len // 4))
        x = task.data("train", batch)[0]
        for name, params in CONFIGS.items():
            config = AttentionConfig(**params)
            ours = build_model(config, task)
            rule_of = rule_factory(config)
            theirs = PatternModel(vocab_size=task.vocab_size, n_classes=task.n_classes, d_model=config.d_model,
                                  n_heads=config.n_heads, n_layers=config.n_layers, rule_of=rule_of)  # fmt: skip
            times: dict[str, list[float]] = {"search": [], "export": []}
            runs = {"search": lambda: ours(x.unsqueeze(0)).float().sum().backward(),
                    "export": lambda: theirs(x).float().sum().backward()}  # fmt: skip
            for _ in range(2):
                for run in runs.values():
                    run()
            for _ in range(7):  # interleaved, so a busy moment hits both
                for key, run in runs.items():
                    start = time.perf_counter()
                    run()
                    times[key].append(time.perf_counter() - start)
            a, b = (1e3 * statistics.median(times[k]) for k in ("search", "export"))
            print(f"{seq_len:>5} {batch:>5} {name:<16} {a:>9.1f} {b:>9.1f} {b / a:>13.2f}")


if __name__ == "__main__":
    main()
