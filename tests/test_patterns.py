from __future__ import annotations

import math
import runpy
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
import torch

from attn_search import PATTERNS, block_layout, pattern_density, pattern_mask
from attn_search.engine.patterns import bigbird_block_table

CASES = {
    "dense": {},
    "window": {"window": 5},
    "dilated": {"window": 3, "dilation": 3},
    "strided": {"stride": 6},
    "bigbird": {"block_size": 8, "n_global": 1, "n_random": 2, "seed": 3},
    "longformer": {"window": 4, "n_global": 2},
}


def brute_force_mask(pattern: str, L: int, causal: bool, p: dict) -> torch.Tensor:
    """Each rule written again, independently, as plain loops over (i, j)."""
    m = torch.zeros(L, L, dtype=torch.bool)
    table = None
    if pattern == "bigbird":
        table = bigbird_block_table(
            math.ceil(L / p["block_size"]),
            n_global=p["n_global"],
            n_random=p["n_random"],
            seed=p["seed"],
            causal=causal,
        )
    for i in range(L):
        for j in range(L):
            d = i - j
            if pattern == "dense":
                ok = True
            elif pattern == "window":
                ok = abs(d) < p["window"]
            elif pattern == "dilated":
                ok = d % p["dilation"] == 0 and abs(d) // p["dilation"] < p["window"]
            elif pattern == "strided":
                ok = abs(d) < p["stride"] or d % p["stride"] == 0
            elif pattern == "bigbird":
                ok = bool(table[i // p["block_size"], j // p["block_size"]])
            else:
                ok = abs(d) < p["window"] or i < p["n_global"] or j < p["n_global"]
            m[i, j] = ok and (j <= i or not causal)
    return m


def test_cases_cover_every_pattern() -> None:
    assert set(CASES) == set(PATTERNS)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_mask_matches_brute_force(pattern: str, causal: bool) -> None:
    L = 37
    mask = pattern_mask(pattern, L, causal=causal, **CASES[pattern])
    assert mask.dtype == torch.bool and mask.shape == (L, L)
    assert torch.equal(mask, brute_force_mask(pattern, L, causal, CASES[pattern]))
    assert mask.diagonal().all(), "every query must keep itself"
    if causal:
        assert not mask.triu(1).any()


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_density_is_exact_fraction(pattern: str, causal: bool) -> None:
    L = 50
    mask = pattern_mask(pattern, L, causal=causal, **CASES[pattern])
    assert pattern_density(pattern, L, causal=causal, **CASES[pattern]) == int(mask.sum()) / (L * L)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_tile_entries_are_what_flexattentions_block_mask_computes(pattern: str, causal: bool) -> None:
    """``attn_tile_flops`` counts the tiles of the BlockMask the exported layer builds on CUDA (its own
    call, run here on the CPU): every 128-tile with a kept entry, whole, edge tiles at their size."""
    from torch.nn.attention.flex_attention import create_block_mask

    from attn_search.engine.patterns import pattern_tile_entries
    from attn_search.engine.plain import table_mask_mod

    L = 520  # 4 tiles of 128, then one of 8
    mask = pattern_mask(pattern, L, causal=causal, **CASES[pattern])
    blocks = create_block_mask(table_mask_mod(mask), None, None, L, L, device="cpu").to_dense()[0, 0].bool()
    size = torch.tensor([128, 128, 128, 128, 8])
    computed = int((size[:, None] * size[None, :])[blocks].sum())
    assert pattern_tile_entries(pattern, L, causal=causal, **CASES[pattern]) == computed
    kept = int(mask.sum())
    assert computed > kept if (pattern != "dense" or causal) else computed == kept


def test_density_formulas_in_docstrings() -> None:
    L = 4096
    # window: (2w - 1)/L bidirectional, w/L causal, minus edge effects
    w = 256
    edge = w * (w - 1) / L**2
    assert pattern_density("window", L, window=w) == pytest.approx((2 * w - 1) / L - edge, rel=1e-9)
    assert pattern_density("window", L, causal=True, window=w) == pytest.approx(w / L - edge / 2, rel=1e-9)
    # dense causal keeps the lower triangle
    assert pattern_density("dense", L, causal=True) == pytest.approx((L + 1) / (2 * L))
    # strided ~ (2s - 1)/L + 1/s
    s = 64
    assert pattern_density("strided", L, stride=s) == pytest.approx((2 * s - 1) / L + 1 / s, rel=0.05)
    # longformer ~ (2w - 1)/L + 2g/L
    assert pattern_density("longformer", L, window=w, n_global=16) == pytest.approx((2 * w - 1 + 32) / L, rel=0.1)


def test_docstring_example() -> None:
    assert pattern_mask("window", 4, causal=True, window=2).int().tolist() == [
        [1, 0, 0, 0],
        [1, 1, 0, 0],
        [0, 1, 1, 0],
        [0, 0, 1, 1],
    ]


def test_bigbird_random_blocks_follow_seed() -> None:
    a = pattern_mask("bigbird", 128, block_size=8, n_random=2, seed=1)
    b = pattern_mask("bigbird", 128, block_size=8, n_random=2, seed=1)
    c = pattern_mask("bigbird", 128, block_size=8, n_random=2, seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    table = bigbird_block_table(16, n_global=1, n_random=2, seed=1, causal=False)
    base = bigbird_block_table(16, n_global=1, n_random=0, seed=1, causal=False)
    assert ((table & ~base).sum(dim=1)[1:] == 2).all(), "each non-global query block gets n_random extra blocks"


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("L,block", [(64, 16), (70, 16), (33, 8)])
def test_block_layout_covers_exactly_the_mask(pattern: str, causal: bool, L: int, block: int) -> None:
    mask = pattern_mask(pattern, L, causal=causal, **CASES[pattern])
    layout = block_layout(pattern, L, block=block, causal=causal, **CASES[pattern])
    n = layout.n_blocks
    rebuilt = torch.zeros(n * block, n * block, dtype=torch.bool)
    seen_rows = []
    for bucket in layout.buckets:
        for i, a in enumerate(bucket.q_blocks.tolist()):
            seen_rows.append(a)
            keep = (
                torch.ones(block, bucket.width * block, dtype=torch.bool)
                if bucket.bias is None
                else bucket.bias[i] == 0
            )
            for slot, b in enumerate(bucket.kv_blocks[i].tolist()):
                tile = keep[:, slot * block : (slot + 1) * block]
                rebuilt[a * block : (a + 1) * block, b * block : (b + 1) * block] |= tile
    assert sorted(seen_rows) == list(range(n))
    assert torch.equal(rebuilt[:L, :L], mask)
    assert layout.kept_entries == int(mask.sum())
    assert layout.computed_entries >= layout.kept_entries


def test_window_layout_skips_tiles() -> None:
    layout = block_layout("window", 4096, block=64, causal=True, window=256)
    assert layout.tile_density < 0.1
    assert layout.computed_entries / layout.kept_entries < 1.3


def test_global_rows_do_not_widen_every_tile() -> None:
    layout = block_layout("longformer", 2048, block=64, window=128, n_global=8)
    widths = sorted(b.width for b in layout.buckets)
    assert widths[-1] == 32 and widths[0] <= 6, widths


@pytest.mark.parametrize(
    "pattern,params,match",
    [
        ("nope", {}, "pattern='nope' is unknown"),
        ("window", {"window": 0}, "window=0 is invalid"),
        ("strided", {"stride": -2}, "stride=-2 is invalid"),
        ("bigbird", {"block_size": 2.5}, "block_size=2.5 is invalid"),
    ],
)
def test_bad_parameters_are_named(pattern: str, params: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        pattern_mask(pattern, 16, **params)


def _captured_tensors(fn: object, seen: set[int] | None = None) -> list[torch.Tensor]:
    """Tensors a rule closes over, through nested closures."""
    seen = seen if seen is not None else set()
    if id(fn) in seen:
        return []
    seen.add(id(fn))
    out: list[torch.Tensor] = []
    for cell in getattr(fn, "__closure__", None) or ():
        value = cell.cell_contents
        if isinstance(value, torch.Tensor):
            out.append(value)
        elif callable(value):
            out += _captured_tensors(value, seen)
    return out


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_rules_are_pointwise_with_tables_on_the_query_device(pattern: str, causal: bool) -> None:
    """FlexAttention's compiled mask_mod on CUDA lowers the rule as a pointwise subgraph: no copy,
    no reduction, no new buffer inside it, and captured tables already on the query's device.
    ``meta`` stands in for CUDA: a table left on the CPU would not mix with meta indices."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from attn_search.engine.patterns import pattern_rule

    rule = pattern_rule(pattern, 77, causal=causal, device="meta", **CASES[pattern])
    for table in _captured_tensors(rule):
        assert table.device.type == "meta", f"{pattern}: a captured table lives on {table.device}"

    calls: list[str] = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            calls.append(str(func.overloadpacket.__name__))
            return func(*args, **(kwargs or {}))

    q, kv = torch.tensor([70, 5, 76], device="meta"), torch.tensor([3, 5, 60], device="meta")  # index vectors
    with Record():
        out = rule(q, kv)
    assert out.device.type == "meta" and out.dtype == torch.bool and out.shape == (3,)
    forbidden = {"_to_copy", "copy_", "clone", "to", "sum", "any", "all", "nonzero", "empty", "zeros", "ones", "cat"}
    assert not forbidden & set(calls), f"{pattern}: non-pointwise ops in the rule: {sorted(forbidden & set(calls))}"


def every_kth(*, stride: int, **_: object) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The toy pattern's rule builder: keys a multiple of ``stride`` back (no local band)."""
    return lambda q, kv: (q - kv) % stride == 0


def test_a_pattern_declared_in_one_place_is_validated_described_and_searched(tmp_path: Path) -> None:
    """A toy pattern (keys at multiples of ``stride`` back, no local band), declared once: configs
    validate, write and describe it, its rule gives the mask, a search proposes and trains it, and
    the Python export carries its rule (a lambda builder is refused with a clear message). Once
    undeclared, it raises."""
    from attn_search import AttentionConfig
    from attn_search.engine import patterns as P
    from attn_search.search.loop import SearchOptions, run_search

    P.declare_pattern(P.Pattern("every_kth", (P.STRIDE,), every_kth))
    try:
        config = AttentionConfig(d_model=16, n_heads=2, pattern="every_kth", stride=3)
        assert config.describe() == "every_kth(s=3) h=2" and config.to_dict()["stride"] == 3
        assert "window" not in config.to_dict()  # the fields it does not read are left out
        mask = P.pattern_mask("every_kth", 7, causal=True, stride=3)
        assert mask[6].nonzero().flatten().tolist() == [0, 3, 6]
        space = tmp_path / "toy.yaml"
        space.write_text(
            "name: toy\ntask: {name: mqar, params: {seq_len: 32, n_pairs: 4, n_keys: 8, n_values: 8}}\n"
            "objectives: {accuracy: maximize, flops: minimize}\n"
            "fixed: {d_model: 16, n_layers: 1, batch_size: 8, warmup_steps: 2}\n"
            "params:\n  pattern: {type: categorical, choices: [every_kth]}\n"
            "  stride: {type: int, low: 2, high: 8, when: {pattern: [every_kth]}}\n"
        )
        out = tmp_path / "run"
        run_search(SearchOptions(space=str(space), trials=3, steps=4, confirm=0, pruner="none", out=str(out),
                                 quiet=True))  # fmt: skip
        trials = pd.read_csv(out / "trials.csv")
        assert (trials["pattern"] == "every_kth").all() and (trials["state"] == "complete").all()
        assert trials["stride"].between(2, 8).all()
        # the Python export carries the toy rule's source: its layer attends exactly that mask
        from attn_search.export import export_run

        path = export_run(out, fmt="python", out=tmp_path / "toy_export.py")
        namespace = runpy.run_path(str(path))
        stride = namespace["PARAMS"]["stride"]
        mask = namespace["pattern_mask_of"](namespace["pattern_rule"], 32, torch.device("cpu"))
        assert torch.equal(mask, P.pattern_mask("every_kth", 32, causal=True, stride=stride))
        assert namespace["build_model"]()(torch.zeros(1, 32, dtype=torch.long)).shape[:2] == (1, 32)
        P.declare_pattern(P.Pattern("every_kth", (P.STRIDE,), lambda *, stride, **_: every_kth(stride=stride)))
        with pytest.raises(ValueError, match="not a module-level function"):
            export_run(out, fmt="python", out=tmp_path / "lambda_export.py")
    finally:
        P.undeclare_pattern("every_kth")
    with pytest.raises(ValueError, match="pattern='every_kth' is unknown"):
        AttentionConfig(pattern="every_kth")
