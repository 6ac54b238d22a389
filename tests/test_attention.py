"""Contract test: every pattern x kernel computes the reference function, forward and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attn_search import PATTERNS, choose_kernel, sparse_attention
from attn_search.engine.attention import layout_for

from .test_patterns import CASES

TOL = 1e-4  # float32 relative error bound from the contract


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def qkv(L: int, *, grad: bool, B: int = 2, H: int = 3, D: int = 16) -> list[torch.Tensor]:
    return [torch.randn(B, H, L, D, requires_grad=grad) for _ in range(3)]


@pytest.mark.parametrize("L", [64, 77])  # 77: not a multiple of the tile
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_blocked_matches_reference_forward_and_gradients(pattern: str, causal: bool, L: int) -> None:
    q, k, v = qkv(L, grad=True)
    grad_out = torch.randn(2, 3, L, 16)
    results = {}
    for kernel in ("reference", "blocked"):
        out = sparse_attention(q, k, v, pattern=pattern, causal=causal, kernel=kernel, tile=16, **CASES[pattern])
        assert out.shape == q.shape
        grads = torch.autograd.grad(out, (q, k, v), grad_out)
        results[kernel] = (out, grads)
    ref_out, ref_grads = results["reference"]
    out, grads = results["blocked"]
    assert rel_err(out, ref_out) < TOL
    for g, rg, name in zip(grads, ref_grads, "qkv", strict=True):
        assert rel_err(g, rg) < TOL, f"d{name}"


@pytest.mark.parametrize("L", [64, 77])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_flex_matches_reference_forward(pattern: str, causal: bool, L: int, eager_flex: None) -> None:
    q, k, v = qkv(L, grad=False)
    with torch.no_grad():
        ref = sparse_attention(q, k, v, pattern=pattern, causal=causal, kernel="reference", **CASES[pattern])
        out = sparse_attention(q, k, v, pattern=pattern, causal=causal, kernel="flex", **CASES[pattern])
    assert rel_err(out, ref) < TOL


@pytest.mark.slow
def test_compiled_flex_matches_reference_on_cpu() -> None:
    q, k, v = qkv(77, grad=False)
    with torch.no_grad():
        ref = sparse_attention(q, k, v, pattern="longformer", causal=True, kernel="reference", window=6, n_global=3)
        out = sparse_attention(q, k, v, pattern="longformer", causal=True, kernel="flex", window=6, n_global=3)
    assert rel_err(out, ref) < TOL


def test_flex_runs_inference_on_leaf_tensors_under_no_grad(eager_flex: None) -> None:
    q, k, v = qkv(40, grad=True)  # e.g. a model's activations evaluated under torch.no_grad()
    with torch.no_grad():
        out = sparse_attention(q, k, v, pattern="window", window=4, kernel="flex")
        ref = sparse_attention(q, k, v, pattern="window", window=4, kernel="reference")
    assert rel_err(out, ref) < TOL


def test_flex_refuses_cpu_training_with_advice() -> None:
    q, k, v = qkv(32, grad=True)
    with pytest.raises(RuntimeError, match=r"no CPU backward.*blocked"):
        sparse_attention(q, k, v, pattern="window", window=4, kernel="flex")


@pytest.mark.parametrize("pattern", PATTERNS)
def test_auto_matches_reference(pattern: str) -> None:
    q, k, v = qkv(200, grad=True)
    ref = sparse_attention(q, k, v, pattern=pattern, causal=True, kernel="reference", **CASES[pattern])
    out = sparse_attention(q, k, v, pattern=pattern, causal=True, kernel="auto", **CASES[pattern])
    assert rel_err(out, ref) < TOL


def test_auto_picks_blocked_for_sparse_training_on_cpu_and_reference_for_dense() -> None:
    assert choose_kernel("window", 4096, device="cpu", training=True, causal=True, window=256) == "blocked"
    assert choose_kernel("dense", 4096, device="cpu", training=True, causal=True) == "reference"
    # nearly dense: gathers would cost more than the skipped tiles save
    assert choose_kernel("window", 128, device="cpu", training=True, window=120) == "reference"
    assert choose_kernel("window", 4096, device="cuda", training=True, window=256) == "flex"
    assert choose_kernel("bigbird", 256, device="cuda", training=True) == "flex"
    # CUDA: attention dropout (DropKey) runs inside FlexAttention's kernel, dense included
    assert choose_kernel("window", 4096, device="cuda", training=True, dropout_p=0.1, window=256) == "flex"
    assert choose_kernel("dense", 256, device="cuda", training=True, dropout_p=0.1) == "flex"
    assert choose_kernel("dense", 4096, device="cuda", training=True, causal=True) == "reference"
    assert choose_kernel("dense", 256, device="cpu", training=True, dropout_p=0.1) == "blocked"
    assert choose_kernel("dense", 256, device="cpu", training=False, dropout_p=0.1) == "reference"


def test_blocked_dropout_gradients_are_exact() -> None:
    """With the dropout mask fixed by the RNG seed, the hand-written backward must match
    finite differences (float64)."""
    q, k, v = (torch.randn(1, 2, 24, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))

    def f(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        torch.manual_seed(123)
        return sparse_attention(
            q, k, v, pattern="window", window=5, causal=True, kernel="blocked", tile=8, dropout_p=0.3
        )

    assert torch.autograd.gradcheck(f, (q, k, v))


def _kept_fraction(out_ones: torch.Tensor) -> float:
    """With q = k = 0 every score is equal, so with v = one-hot keys the output row is the
    indicator of the keys kept over their number: the kept fraction is mean(out > 0)."""
    return float((out_ones > 0).float().mean())


@pytest.mark.parametrize("kernel", ["blocked", "reference"])
def test_dropkey_drops_keys_at_the_rate_and_keeps_the_diagonal(kernel: str) -> None:
    L, p = 48, 0.3
    q = k = torch.zeros(8, 2, L, L)
    v = torch.eye(L).expand(8, 2, L, L)  # value j is the indicator of key j
    out = sparse_attention(q, k, v, pattern="dense", kernel=kernel, tile=16, dropout_p=p)
    kept = out > 0  # (B, H, L, L): which keys each query kept
    assert kept.diagonal(dim1=-2, dim2=-1).all(), "a query's own key is never dropped"
    off = ~torch.eye(L, dtype=torch.bool)
    assert kept[..., off].float().mean().item() == pytest.approx(1 - p, abs=0.01)
    # the kept keys share the softmax: rows sum to 1 (renormalised, not rescaled by 1/(1-p))
    torch.testing.assert_close(out.sum(-1), torch.ones(8, 2, L))
    # only keys the pattern allows are ever kept, and a fresh call draws fresh drops
    causal = sparse_attention(q, k, v, pattern="dense", causal=True, kernel=kernel, tile=16, dropout_p=p)
    assert not (causal > 0).triu(1).any()
    again = sparse_attention(q, k, v, pattern="dense", kernel=kernel, tile=16, dropout_p=p)
    assert not torch.equal(again > 0, kept)


def test_the_dropkey_hash_is_uniform_and_independent_across_its_indices() -> None:
    from attn_search.engine.attention import hash_uniform

    idx = torch.arange(64)
    u = hash_uniform(torch.tensor(7), idx[:, None, None, None], idx[None, :4, None, None], idx[None, None, :, None],
                     idx[None, None, None, :])  # fmt: skip  # (64, 4, 64, 64)
    assert u.min() >= 0 and u.max() < 1
    assert u.mean().item() == pytest.approx(0.5, abs=0.005)
    assert (u < 0.1).float().mean().item() == pytest.approx(0.1, abs=0.005)
    flat = u.flatten()
    # neighbours along every index are uncorrelated
    for dim in range(4):
        a, b = u.narrow(dim, 0, u.shape[dim] - 1), u.narrow(dim, 1, u.shape[dim] - 1)
        assert abs(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()) < 0.01, dim
    assert len(torch.unique(flat)) > 0.95 * len(flat)  # 2**24 levels: ~3% of 2**20 draws collide by chance
    assert not torch.equal(
        u[0], hash_uniform(torch.tensor(8), idx[0], idx[:4, None, None], idx[None, :, None], idx[None, None, :])
    )


def _inlined_size(score_mod: object) -> int:
    """Nodes Inductor lowers for ``score_mod`` inlined into FlexAttention's kernel: it lowers a pointwise
    chain as a tree, every use of a value lowering it again, so a node counts once per path to the
    output (the traced graph counts it once)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    i = torch.tensor(3)
    graph = make_fx(score_mod)(torch.tensor(0.5), i, i, i, i).graph  # type: ignore[arg-type]
    size: dict[object, int] = {}
    for node in graph.nodes:
        size[node] = 1 + sum(size[a] for a in node.all_input_nodes)
    return size[next(n for n in graph.nodes if n.op == "output")]


def test_the_dropkey_kernels_stay_small_when_inductor_inlines_them() -> None:
    """A hash round per index (five murmur3 finalisers) lowered to 243,422 nodes: compiling DropKey's
    FlexAttention took minutes on an H200 and 601 s on the CPU. Two rounds lower to under a thousand."""
    from attn_search.engine import plain
    from attn_search.engine.attention import dropkey_score_mod

    seed = torch.tensor(7)
    # (the member model's per-member rate, rates[b], is one lookup more; tracing it needs b < len(rates))
    for score_mod in (plain.dropkey_score_mod(torch.tensor(0.1), seed),
                      dropkey_score_mod(torch.tensor([0.1]), seed, per_batch=False)):  # fmt: skip
        assert _inlined_size(score_mod) < 2000


@pytest.mark.slow
def test_inductor_compiles_the_dropkey_kernel_to_the_drops_of_eager_torch() -> None:
    """FlexAttention with DropKey compiled by Inductor (its C++ build here; 20-30 s, before the hash had
    two rounds 601 s) drops exactly what the uncompiled kernel drops: the int64 arithmetic agrees."""
    from torch._inductor.compile_fx import compile_fx
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from attn_search.engine import plain

    compiles = []

    def inductor(gm: torch.fx.GraphModule, inputs: list[torch.Tensor]) -> object:
        compiles.append(gm)
        return compile_fx(gm, inputs)

    L = 128
    block_mask = create_block_mask(plain.table_mask_mod(torch.ones(L, L, dtype=torch.bool).tril()), None, None, L, L,
                                   device="cpu")  # fmt: skip
    q, k, v = (torch.randn(2, 2, L, 16) for _ in range(3))
    score_mod = plain.dropkey_score_mod(torch.tensor(0.3), torch.tensor(123456789))
    torch._dynamo.reset()
    try:
        compiled = torch.compile(flex_attention, dynamic=False, backend=inductor)(
            q, k, v, block_mask=block_mask, score_mod=score_mod
        )
        assert compiles, "Inductor compiled nothing: dynamo ran FlexAttention eagerly"
    finally:
        torch._dynamo.reset()
    eager = flex_attention(q, k, v, block_mask=block_mask, score_mod=score_mod)
    undropped = flex_attention(q, k, v, block_mask=block_mask)
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(eager, undropped, atol=1e-3)


def test_dropkey_score_mod_matches_its_dense_mask(eager_flex: None) -> None:
    """The FlexAttention path (CUDA's) drops exactly the keys its hash says, per member."""
    from attn_search.engine.attention import _flex, dropkey_score_mod, hash_uniform, member_block_mask

    K, BH, L, D = 3, 4, 32, 16
    q, k, v = (torch.randn(K, BH, L, D) for _ in range(3))
    masks = torch.ones(K, L, L, dtype=torch.bool).tril()
    rates, seed = torch.tensor([0.0, 0.2, 0.5]), torch.tensor(11)
    out = _flex(q, k, v, member_block_mask(masks), score_mod=dropkey_score_mod(rates, seed, per_batch=True))
    b, h, i, j = (torch.arange(n).view(*([1] * a), n, *([1] * (3 - a))) for a, n in enumerate((K, BH, L, L)))
    keep = ~((hash_uniform(seed, b, h, i, j) < rates.view(K, 1, 1, 1)) & (i != j)) & masks[:, None]
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    dropped = (~keep & masks[:, None]).flatten(1).float().sum(1) / masks[:, None].expand_as(keep).flatten(1).sum(1)
    assert dropped[0] == 0 and 0.1 < dropped[1] < 0.3 and 0.4 < dropped[2] < 0.6


def test_layout_is_cached_per_shape() -> None:
    a = layout_for("window", 512, causal=True, window=64)
    b = layout_for("window", 512, causal=True, window=64)
    assert a is b


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"kernel": "fast"}, "kernel='fast' is unknown"),
        ({"pattern": "diagonal"}, "pattern='diagonal' is unknown"),
        ({"tile": 0, "kernel": "blocked"}, "tile=0 is invalid"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs: dict, match: str) -> None:
    q, k, v = qkv(16, grad=False)
    args = {"pattern": "window", "window": 4} | kwargs
    with pytest.raises(ValueError, match=match):
        sparse_attention(q, k, v, **args)


def test_shape_mismatch_is_refused() -> None:
    q, k, v = qkv(16, grad=False)
    with pytest.raises(ValueError, match=r"\(B, H, L, D\)"):
        sparse_attention(q, k[:, :, :8], v, pattern="dense")


BF16_TOL = 2e-2  # bf16 has an 8-bit mantissa: about 4e-3 relative error per rounding


@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_blocked_trains_under_bf16_autocast_like_reference(pattern: str, dropout_p: float) -> None:
    """Under autocast the blocked kernel must run forward and backward (on CUDA, trials train under
    bf16 autocast) and stay as close to the float32 result as the reference under autocast is."""
    q, k, v = qkv(77, grad=True, D=8)
    grad_out = torch.randn(2, 3, 77, 8)
    exact = sparse_attention(q, k, v, pattern=pattern, causal=True, kernel="reference", **CASES[pattern])
    exact_grads = torch.autograd.grad(exact, (q, k, v), grad_out)
    errors = {}
    for kernel in ("reference", "blocked"):
        torch.manual_seed(5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = sparse_attention(q, k, v, pattern=pattern, causal=True, kernel=kernel, tile=16,
                                   dropout_p=dropout_p, **CASES[pattern])  # fmt: skip
        assert out.dtype == torch.bfloat16
        grads = torch.autograd.grad(out, (q, k, v), grad_out)
        assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
        if dropout_p == 0:
            errors[kernel] = [
                rel_err(out.float(), exact),
                *(rel_err(g, e) for g, e in zip(grads, exact_grads, strict=True)),
            ]
    if dropout_p == 0:
        assert max(errors["blocked"]) < BF16_TOL, errors
        assert max(errors["blocked"]) < 3 * max(errors["reference"]), errors


@pytest.mark.parametrize("head_dim", [2, 8, 12])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_flex_pads_head_dims_below_16_exactly(pattern: str, head_dim: int, eager_flex: None) -> None:
    """FlexAttention's kernels refuse head dims below 16; the zero-padded path must equal the
    reference (the scale is that of the true head dim)."""
    q, k, v = qkv(77, grad=False, D=head_dim)
    with torch.no_grad():
        ref = sparse_attention(q, k, v, pattern=pattern, causal=True, kernel="reference", **CASES[pattern])
        out = sparse_attention(q, k, v, pattern=pattern, causal=True, kernel="flex", **CASES[pattern])
    assert out.shape == q.shape
    assert rel_err(out, ref) < TOL


def test_flex_pads_small_head_dims_before_calling_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    from attn_search.engine import attention

    seen: list[tuple[int, float | None]] = []

    def fake_flex(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        block_mask: object,
        scale: float | None = None,
        score_mod: object = None,
    ):  # type: ignore[no-untyped-def]
        seen.append((q.shape[-1], scale))
        return v

    monkeypatch.setattr(attention, "_flex_fn", lambda: fake_flex)
    q, k, v = qkv(32, grad=False, D=8)
    out = sparse_attention(q, k, v, pattern="window", window=4, kernel="flex")
    assert seen == [(16, pytest.approx(8**-0.5))] and out.shape == q.shape


@pytest.mark.slow  # (15-31 s: the default suite stays under 10 minutes on 2 cores)
def test_one_by_one_flex_compiles_once_for_every_pattern_and_parameter(flex_compiles: dict[str, int]) -> None:
    """A search's one-by-one trials on CUDA run FlexAttention with each trial's pattern: its mask
    rule reads a table (up to TABLE_MASK_MAX_LEN), so new patterns and parameter values reuse the
    compiled kernel instead of compiling one each toward dynamo's recompile limit. Counted with a
    counting compiler backend on the CPU's forward path."""
    compiles = flex_compiles
    q = torch.randn(2, 2, 128, 16)
    cases = [("window", {"window": 4}), ("window", {"window": 9}), ("dilated", {"window": 8, "dilation": 3}),
             ("strided", {"stride": 7}), ("longformer", {"window": 6, "n_global": 2})]  # fmt: skip
    with torch.no_grad():
        for pattern, params in cases:
            out = sparse_attention(q, q, q, pattern=pattern, kernel="flex", **params)
            ref = sparse_attention(q, q, q, pattern=pattern, kernel="reference", **params)
            assert torch.allclose(out, ref, atol=1e-5), (pattern, params)
    assert compiles["n"] == 1


def test_a_sparse_pattern_that_keeps_every_entry_runs_dense_attention(monkeypatch: pytest.MonkeyPatch) -> None:
    """BigBird(32, 4, 3) keeps every causal entry at L=256: ``auto`` runs it as dense attention
    (SDPA's fused causal kernel, no mask tensor), the same function; at L=512 it is sparse again."""
    from attn_search.engine import attention
    from attn_search.engine.patterns import keeps_everything

    params = {"block_size": 32, "n_global": 4, "n_random": 3}
    assert keeps_everything("bigbird", 256, causal=True, **params)
    assert not keeps_everything("bigbird", 512, causal=True, **params)
    calls: list[dict] = []
    sdpa = F.scaled_dot_product_attention

    def spy(*args: torch.Tensor, **kwargs: object) -> torch.Tensor:
        calls.append(kwargs)
        return sdpa(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", spy)
    q, k, v = qkv(256, grad=False)
    out = sparse_attention(q, k, v, pattern="bigbird", causal=True, **params)
    assert calls == [{"is_causal": True}]
    reference = sparse_attention(q, k, v, pattern="bigbird", causal=True, kernel="reference", **params)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
    calls.clear()
    q, k, v = qkv(512, grad=False)
    sparse_attention(q, k, v, pattern="bigbird", causal=True, **params)
    assert calls != [{"is_causal": True}]
