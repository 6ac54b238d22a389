from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from attn_search import AttentionConfig, build_model, make_task, model_flops, pattern_density
from attn_search.engine.cost import (
    analytic_compute,
    attention_flops,
    measure_latency_ms,
    model_attention_flops,
    model_attention_tile_flops,
    peak_memory_mb,
)
from attn_search.engine.metrics import ATTN_TILE_FLOPS


@pytest.mark.parametrize("d_model,n_layers,n_heads,L", [(64, 1, 4, 128), (32, 3, 2, 200), (96, 2, 6, 64)])
def test_analytic_flops_match_flop_counter_on_dense_path(d_model: int, n_layers: int, n_heads: int, L: int) -> None:
    config = AttentionConfig(d_model=d_model, n_layers=n_layers, n_heads=n_heads, pattern="dense", causal=False)
    task = make_task("mqar", seq_len=L, n_pairs=4)
    model = build_model(config, task, kernel="reference").eval()
    x, _ = task.data("eval", 3)
    # PyTorch's counter has no entry for its CPU flash-attention kernel; give it torch's own SDPA
    # formula (the one registered for the CUDA kernels) so the attention term is counted.
    aten = torch.ops.aten

    def cpu_sdpa_flops(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:  # type: ignore[no-untyped-def]
        return sdpa_flop_count(q_shape, k_shape, v_shape)

    cpu_sdpa = {aten._scaled_dot_product_flash_attention_for_cpu: cpu_sdpa_flops}
    counter = FlopCounterMode(display=False, custom_mapping=cpu_sdpa)
    with counter, torch.no_grad():
        model(x)
    measured_per_seq = counter.get_total_flops() / 3
    analytic = model_flops(config, seq_len=L, n_classes=task.n_classes)
    assert analytic == pytest.approx(measured_per_seq, rel=0.05)
    # attn_flops is the attention kernel's share of that count alone (the projections are the rest)
    sdpa = sum(n for op, n in counter.get_flop_counts()["Global"].items() if "scaled_dot_product" in str(op)) / 3
    assert sdpa > 0 and model_attention_flops(config, seq_len=L) == pytest.approx(sdpa, rel=1e-6)


def test_sparse_flops_count_only_kept_entries() -> None:
    L = 1024
    dense = AttentionConfig(pattern="dense", causal=True)
    window = AttentionConfig(pattern="window", window=64, causal=True)
    ratio = attention_flops(dense, L) / attention_flops(window, L)
    expected = pattern_density("dense", L, causal=True) / pattern_density("window", L, causal=True, window=64)
    assert ratio == pytest.approx(expected)
    assert ratio > 7
    # the projections are the same, so whole-model flops differ by exactly the attention term
    diff = model_flops(dense, seq_len=L, n_classes=10) - model_flops(window, seq_len=L, n_classes=10)
    assert diff == attention_flops(dense, L) - attention_flops(window, L)


def test_tile_flops_rank_bigbird_blocks_as_an_h200_ran_them() -> None:
    """At L=8192 BigBird with blocks of 64 keeps half the entries of blocks of 128, so attn_flops
    ranks it cheaper; it touches more 128-tiles, and on an H200 it trained 1.4x slower
    (benchmarks/results/gpu_h200_2026-12-04.txt: 2.90 against 2.05 ms a forward+backward). The tile
    count ranks the four kernels measured there in the order they ran."""
    L = 8192
    configs = {
        "bigbird64": AttentionConfig(pattern="bigbird", block_size=64, n_global=2, n_random=3, causal=True),
        "bigbird128": AttentionConfig(pattern="bigbird", block_size=128, n_global=2, n_random=3, causal=True),
        "longformer": AttentionConfig(pattern="longformer", window=256, n_global=16, causal=True),
        "window": AttentionConfig(pattern="window", window=256, causal=True),
    }
    measured_ms = {"bigbird64": 2.897, "bigbird128": 2.045, "longformer": 1.837, "window": 1.364}  # that file
    tiles = {k: model_attention_tile_flops(c, seq_len=L) for k, c in configs.items()}
    entries = {k: model_attention_flops(c, seq_len=L) for k, c in configs.items()}
    assert sorted(tiles, key=tiles.__getitem__) == sorted(measured_ms, key=measured_ms.__getitem__)
    assert entries["bigbird64"] < entries["bigbird128"]  # what the entries say
    assert tiles["bigbird64"] > tiles["bigbird128"]
    for k, c in configs.items():
        assert tiles[k] > entries[k]
        assert analytic_compute(ATTN_TILE_FLOPS, c, seq_len=L, n_classes=2) == tiles[k]
    # one tile or less: every pattern costs dense's (a 64-token task trains dense attention on a GPU)
    short = [model_attention_tile_flops(c, seq_len=64) for c in configs.values()]
    assert short == [model_attention_tile_flops(AttentionConfig(pattern="dense", causal=True), seq_len=64)] * 4


def test_attention_flops_rank_like_model_flops_and_their_ratio_does_not_depend_on_width() -> None:
    """Within a width and depth the two analytic metrics differ by the same amount for every pattern
    (so a normalised front is the same under either); between patterns, attention FLOPs keep the
    entries' ratio at any width, while the whole model's ratio shrinks as the projections grow."""
    L = 4096
    patterns = [dict(pattern="window", window=8), dict(pattern="bigbird", block_size=32, n_global=4, n_random=3),
                dict(pattern="dilated", window=128, dilation=4), dict(pattern="dense")]  # fmt: skip
    ratios = {}
    for d in (64, 512):
        configs = [AttentionConfig(d_model=d, n_heads=4, n_layers=2, **p) for p in patterns]  # type: ignore[arg-type]
        whole = [model_flops(c, seq_len=L, n_classes=32) for c in configs]
        attn = [analytic_compute("attn_flops", c, seq_len=L, n_classes=32) for c in configs]
        assert len({w - a for w, a in zip(whole, attn, strict=True)}) == 1
        ratios[d] = (attn[-1] / attn[0], whole[-1] / whole[0])
    assert ratios[64][0] == pytest.approx(ratios[512][0]) and ratios[64][0] > 200  # dense / window(8): entries
    assert ratios[64][1] < 7 and ratios[512][1] < ratios[64][1]  # the whole model's: 6x at d=64, less when wider
    with pytest.raises(ValueError, match="measured, not counted"):
        analytic_compute("latency_ms", configs[0], seq_len=L, n_classes=32)


def test_latency_is_a_median_of_timed_runs() -> None:
    calls = []

    def fn() -> None:
        calls.append(1)
        torch.randn(200, 200) @ torch.randn(200, 200)

    ms = measure_latency_ms(fn, device=torch.device("cpu"), warmup=2, repeats=5)
    assert ms > 0 and len(calls) == 7


def test_peak_memory_sees_a_large_temporary() -> None:
    def alloc(n: int) -> int:
        x = torch.ones(n)  # touched, so resident
        return int(x[0])

    small_result, small = peak_memory_mb(lambda: alloc(1_000_000), device=torch.device("cpu"))  # 4 MB
    big_result, big = peak_memory_mb(lambda: alloc(50_000_000), device=torch.device("cpu"))  # 200 MB
    assert small_result == big_result == 1
    assert 150 < big < 260, big
    assert small < 40, small


def test_latency_is_a_median_and_its_spread_flags_a_busy_machine() -> None:
    """One slow run among the timed ones (another process took the core) moves the median little
    and shows in the spread, which the search reports above ``LATENCY_SPREAD_WARN``."""
    import time

    from attn_search.engine import metrics as M
    from attn_search.engine.cost import measure_latency

    calls = []

    def fn() -> None:
        calls.append(1)
        time.sleep(0.030 if len(calls) == 4 else 0.002)  # the 2nd timed run after 2 warm-ups is slow

    ms, spread = measure_latency(fn, device=torch.device("cpu"), warmup=2, repeats=5)
    assert ms < 10 and spread > M.LATENCY_SPREAD_WARN
    calls.clear()
    _, quiet = measure_latency(lambda: time.sleep(0.005), device=torch.device("cpu"), warmup=1, repeats=5)
    assert quiet < M.LATENCY_SPREAD_WARN
