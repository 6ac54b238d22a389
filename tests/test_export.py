"""The plain model the Python export writes out (``attn_search/engine/plain.py``): its CPU tile path
against dense masked attention, with and without DropKey. (The export as a whole, every pattern
against the searched model, is in test_search.py.)"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attn_search.engine.patterns import pattern_mask
from attn_search.engine.plain import Tiles


@pytest.mark.parametrize(("pattern", "params"), [("bigbird", {"block_size": 16, "n_global": 1, "n_random": 2}),
                                                  ("longformer", {"window": 20, "n_global": 3})])  # fmt: skip
def test_tiles_equal_dense_masked_attention_forward_and_backward(pattern: str, params: dict[str, int]) -> None:
    """A length that is no multiple of the tile (padded rows), tile groups of several widths, and
    a hand-written backward: outputs and the three gradients equal SDPA with the full mask."""
    L = 150
    mask = pattern_mask(pattern, L, causal=True, **params)
    tiles = Tiles(mask, tile=32)
    assert len({keys.shape[1] for _, keys, _ in tiles.groups}) > 1
    q, k, v = (torch.randn(2, 3, L, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    grad = torch.randn(2, 3, L, 8, dtype=torch.float64)
    out = tiles(q, k, v, 0.3, 0.0)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)
    assert torch.allclose(out, ref, atol=1e-10)
    mine = torch.autograd.grad(out, (q, k, v), grad)
    theirs = torch.autograd.grad(ref, (q, k, v), grad)
    for a, b in zip(mine, theirs, strict=True):
        assert torch.allclose(a, b, atol=1e-10), (a - b).abs().max()


def test_dropkey_on_the_tiles_drops_keys_at_the_rate_inside_the_mask_and_keeps_the_diagonal() -> None:
    """With values ``v = I`` the output rows are the attention probabilities: each row sums to 1,
    nothing outside the pattern gets weight, a query's own key is never dropped, and about the
    rate of the pattern's other keys is (at 0.5 over 16 draws of 64 x 64 entries)."""
    L, rate = 64, 0.5
    mask = pattern_mask("window", L, causal=True, window=16)
    tiles = Tiles(mask, tile=16)
    q = torch.randn(16, 1, L, L, requires_grad=True)
    k = torch.randn(16, 1, L, L)
    p = tiles(q, k, torch.eye(L).expand(16, 1, L, L), 0.1, rate)  # (16, 1, L, L): rows of P
    assert torch.allclose(p.sum(-1), torch.ones(16, 1, L), atol=1e-5)
    assert (p[..., ~mask] == 0).all() and (p.diagonal(dim1=-2, dim2=-1) > 0).all()
    off = mask & ~torch.eye(L, dtype=torch.bool)
    dropped = (p[..., off] == 0).float().mean().item()
    assert abs(dropped - rate) < 0.03, dropped
    (g,) = torch.autograd.grad(p.square().sum(), q)
    assert torch.isfinite(g).all() and g.abs().max() > 0


def test_the_cuda_mask_mod_reads_the_table_and_clamps_positions_past_the_end() -> None:
    """FlexAttention evaluates ``mask_mod`` on whole 128-position tiles: at L=150 it asks for
    positions up to 255, which must not read outside the table (an illegal access on CUDA)."""
    from attn_search.engine.plain import table_mask_mod

    mask = pattern_mask("bigbird", 150, causal=True, block_size=16, n_global=1, n_random=2)
    mod = table_mask_mod(mask)
    q, kv = torch.meshgrid(torch.arange(150), torch.arange(150), indexing="ij")
    zero = torch.zeros_like(q)
    assert torch.equal(mod(zero, zero, q, kv), mask)
    far = torch.tensor([200, 255, 149])
    assert torch.equal(mod(far, far, far, torch.tensor([3, 255, 0])), mask[[149, 149, 149], [3, 149, 0]])


def test_the_cpu_path_follows_the_tile_grid_and_attention_dropout() -> None:
    """SDPA over the mask where the tiles would cover most of the grid (a window of 8 at L=200),
    the tiles where they are few (at L=1024), and the tiles whenever the layer drops keys (a drawn
    L x L mask would cost more). A length that is not a multiple of the tile adds no tile: padded
    query rows see only their own padded key."""
    from attn_search.engine.patterns import pattern_rule
    from attn_search.engine.plain import MAX_TILE_DENSITY, PatternAttention

    def rule_of(L: int, dev: torch.device):  # type: ignore[no-untyped-def]
        return pattern_rule("window", L, causal=True, device=dev, window=8)

    def path(L: int, drop: float) -> str:
        return PatternAttention(32, 2, rule_of, attn_dropout=drop)._plan(L, torch.device("cpu"))[2][0]

    assert Tiles(pattern_mask("window", 200, causal=True, window=8)).density > MAX_TILE_DENSITY
    assert (path(200, 0.0), path(200, 0.1), path(1024, 0.0)) == ("masked", "tiles", "tiles")
    # 4 query tiles of 64 at L=200 as at 256, each with 2 key tiles (the diagonal and the one below,
    # the first one's padded): 8 of 16 either way (before, L=200's padded rows also needed key tile 0)
    assert Tiles(pattern_mask("window", 200, causal=True, window=8)).density == pytest.approx(8 / 16)
    assert Tiles(pattern_mask("window", 256, causal=True, window=8)).density == pytest.approx(8 / 16)
