"""CUDA paths, run where a GPU is present (``pytest -m gpu``); deselected without CUDA (see
conftest.py). Every failure class here also has a CPU test: bf16 autocast of the blocked kernel
(test_attention.py), the pointwise BigBird rule with device tables (test_patterns.py), the padded
FlexAttention path for head dims below 16 (test_attention.py)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from attn_search import PATTERNS, AttentionConfig, Budget, evaluate, make_task, sparse_attention

from .test_patterns import CASES

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parent.parent
TINY_BUDGET = Budget(steps=6, rungs=1, n_eval=64, latency_batch=2)
SEARCHED = {  # the pattern parameters the shipped spaces search, at values they can produce
    "dense": {},
    "window": {"window": 70},
    "dilated": {"window": 20, "dilation": 3},
    "strided": {"stride": 13},
    "bigbird": {"block_size": 16, "n_global": 2, "n_random": 3},
    "longformer": {"window": 22, "n_global": 4},
}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("attn_dropout", [0.0, 0.1])
@pytest.mark.parametrize("head_dim", [8, 16, 32])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_every_pattern_trains_on_cuda(pattern: str, head_dim: int, attn_dropout: float) -> None:
    config = AttentionConfig(d_model=64, n_heads=64 // head_dim, pattern=pattern, attn_dropout=attn_dropout,
                             dropout=0.1, **SEARCHED[pattern])  # fmt: skip
    result = evaluate(config, "mqar", budget=TINY_BUDGET, device="cuda")
    assert result.state == "complete", result.reason
    assert result.device.startswith("cuda")
    assert math.isfinite(result.metrics["final_loss"]) and 0.0 <= result.metrics["accuracy"] <= 1.0


@pytest.mark.parametrize("head_dim", [8, 32])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_flex_matches_reference_on_cuda_under_bf16(pattern: str, head_dim: int) -> None:
    q, k, v = (torch.randn(2, 4, 333, head_dim, device="cuda", requires_grad=True) for _ in range(3))
    grad_out = torch.randn(2, 4, 333, head_dim, device="cuda")
    exact = sparse_attention(q.double(), k.double(), v.double(), pattern=pattern, causal=True, kernel="reference",
                             **CASES[pattern])  # fmt: skip
    exact_grads = torch.autograd.grad(exact, (q, k, v), grad_out.double())
    for kernel in ("flex", "blocked", "reference"):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = sparse_attention(q, k, v, pattern=pattern, causal=True, kernel=kernel, **CASES[pattern])
        grads = torch.autograd.grad(out, (q, k, v), grad_out)
        errors = [rel_err(out, exact), *(rel_err(g, e) for g, e in zip(grads, exact_grads, strict=True))]
        assert max(errors) < 2e-2, (kernel, errors)


def test_attention_dropout_on_cuda_drops_and_renormalises() -> None:
    # (DropKey renormalises over the keys kept: with v = ones every output is 1, so a spread of the
    # output, what this test checked before, cannot show drops; compare with and without them)
    q, k, v = (torch.randn(4, 4, 256, 16, device="cuda") for _ in range(3))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        kept = sparse_attention(q, k, v, pattern="window", window=32, kernel="auto", dropout_p=0.0)
        dropped, again = (sparse_attention(q, k, v, pattern="window", window=32, kernel="auto", dropout_p=0.5)
                          for _ in range(2))  # fmt: skip
        ones = sparse_attention(q, k, torch.ones_like(v), pattern="window", window=32, kernel="auto", dropout_p=0.5)
    assert (dropped.float() - kept.float()).abs().mean().item() > 0.05  # half the keys dropped moves the output
    assert (dropped.float() - again.float()).abs().mean().item() > 0.05  # fresh drops at each call
    torch.testing.assert_close(ones.float(), torch.ones_like(ones, dtype=torch.float32), atol=2e-2, rtol=0)


def test_smoke_search_on_cuda_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "run"
    r = subprocess.run(
        [sys.executable, str(ROOT / "run_search.py"), "--space", "sparse", "--device", "cuda", "--preset", "smoke",
         "--out", str(out)],
        capture_output=True, text=True, timeout=900, cwd=tmp_path, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    trials = pd.read_csv(out / "trials.csv")
    assert len(trials) == 6 and not (trials["state"] == "failed").any(), trials[["state", "reason"]]
    assert trials["device"].str.startswith("cuda").all()
    assert trials["slot"].nunique() == 1  # the default population on CUDA (16) takes all 6 trials
    # a population that raised would have retrained its members one at a time: correct results,
    # most of the GPU's speed lost; the smoke test must see it
    errors = out / "errors.log"
    assert "(population)" not in (errors.read_text() if errors.exists() else ""), errors.read_text()
    assert "retrained alone" not in r.stdout


@pytest.mark.parametrize(("head_dim", "attn_dropout"), [(8, 0.0), (32, 0.1)])  # padded flex; the dropout path
def test_a_population_of_every_pattern_trains_on_cuda(head_dim: int, attn_dropout: float) -> None:
    """One population, every pattern (one FlexAttention kernel reading each member's mask row),
    under bf16 autocast; results like the members' own trials (bf16: within 0.1)."""
    from attn_search import evaluate_many

    configs = [AttentionConfig(d_model=64, n_heads=64 // head_dim, pattern=p, attn_dropout=attn_dropout, seed=i,
                               **SEARCHED[p]) for i, p in enumerate(PATTERNS)]  # fmt: skip
    budget = Budget(steps=60, rungs=2, n_eval=128, latency_batch=2)
    together = evaluate_many(configs, "mqar", budget=budget, device="cuda")
    for c, r in zip(configs, together, strict=True):
        assert r.state == "complete" and r.device.startswith("cuda"), r.reason
        alone = evaluate(c, "mqar", budget=budget, device="cuda")
        assert abs(r.metrics["accuracy"] - alone.metrics["accuracy"]) <= 0.1, (c.pattern, r.curve, alone.curve)


def test_a_fused_member_equals_its_twin_on_cuda_through_the_block_mask() -> None:
    """The FlexAttention member path (a BlockMask per head group, each member's mask row, the
    grouped head layout for head counts 2, 4 and 8) under bf16 autocast: each member's logits match its model alone to bf16
    rounding (relative error < 2e-2), a tolerance a member reading another member's mask row
    would exceed, where 0.1 accuracy after 60 steps would not."""
    from attn_search import build_model, make_task

    configs = [AttentionConfig(d_model=64, n_heads=(2, 4, 8)[i % 3], pattern=p, seed=i, **SEARCHED[p])
               for i, p in enumerate(PATTERNS)]  # fmt: skip
    task = make_task("mqar", seq_len=256, n_pairs=16)
    fused = build_model(configs, task).cuda().eval()
    x, _ = task.data("eval", 4)
    x = x.cuda()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        out = fused(x.unsqueeze(0).expand(len(configs), -1, -1))
        assert fused.blocks[0].attn._plan(256, x.device).block_masks is not None  # the BlockMask path ran
        for k, c in enumerate(configs):
            alone = build_model(c, task, kernel="reference").cuda().eval()(x)
            assert rel_err(out[k], alone) < 2e-2, (c.pattern, rel_err(out[k], alone))


def test_a_population_trains_the_same_as_a_captured_cuda_graph() -> None:
    """``ATTN_SEARCH_CUDA_GRAPHS=1``: the step captured once and replayed gives the eager step's
    losses (no dropout, so the draws cannot differ), through a refill in place and one that drops
    the training plan (attention dropout where none was planned), which captures again."""
    from attn_search.engine import trainer as T

    configs = [AttentionConfig(d_model=64, n_heads=(2, 4, 8)[i % 3], pattern=p, seed=i, **SEARCHED[p])
               for i, p in enumerate(PATTERNS)]  # fmt: skip
    task = make_task("mqar", seq_len=128, n_pairs=8)
    runs = []
    for graphed in (False, True):
        pop = T.Population(list(enumerate(configs)), task, T.PRESETS["default"], torch.device("cuda"), "auto",
                            heads=(2, 8))  # fmt: skip
        step = T._GraphedStep(pop) if graphed else pop.train_step
        losses = [step().clone() for _ in range(8)]
        pop._admit(1, 100, configs[1].replace(seed=77, pattern="window", window=16))  # in place
        losses += [step().clone() for _ in range(4)]
        pop._admit(2, 101, configs[2].replace(seed=78, attn_dropout=0.1))  # the plan is rebuilt
        losses += [step().clone() for _ in range(6)]
        runs.append(torch.stack(losses)[:, [0, 1, 3]])  # (member 2 now draws DropKey masks)
        if graphed:
            assert step.captures == 2, step.captures
    assert torch.allclose(runs[0], runs[1], rtol=1e-3, atol=1e-4), (runs[0] - runs[1]).abs().max()


def test_the_exported_model_runs_flex_on_cuda_and_matches_the_search(tmp_path: Path) -> None:
    """The plain model of the Python export takes FlexAttention's path on CUDA (a length that is
    no multiple of its 128-position tiles) and, given the searched weights, computes what the
    searched model computes, forward and backward."""
    import importlib.util

    from attn_search import build_model
    from attn_search.export import python_module

    config = AttentionConfig(d_model=64, n_heads=4, pattern="bigbird", block_size=16, n_global=1, n_random=2)
    task = make_task("mqar", seq_len=200, n_pairs=8)
    path = tmp_path / "exported.py"
    path.write_text(python_module(config, vocab_size=task.vocab_size, n_classes=task.n_classes, max_len=200))
    # (the other ways a user loads a file, runpy's included: test_search.py, on the CPU)
    spec = importlib.util.spec_from_file_location("exported_gpu", path)
    assert spec is not None and spec.loader is not None
    module = sys.modules["exported_gpu"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    ns = vars(module)
    ours = build_model(config, task, kernel="reference").cuda().eval()
    theirs = ns["build_model"]().cuda().eval()
    ns["load_searched"](theirs, ours.state_dict())
    x = task.data("eval", 4)[0].cuda()
    out, ref = theirs(x), ours(x)
    assert theirs.blocks[0].attn._plans[200, x.device][2][0] == "flex"
    assert rel_err(out, ref) < 1e-3, rel_err(out, ref)
    out.square().mean().backward()
    ref.square().mean().backward()
    g_theirs, g_ours = theirs.blocks[0].attn.qkv.weight.grad.T, ours.blocks[0].attn.qkv.weight.grad[0]
    assert rel_err(g_theirs, g_ours) < 1e-2, rel_err(g_theirs, g_ours)
