from __future__ import annotations

import pytest
import torch

from attn_search import PATTERNS, AttentionConfig, build_model, make_task

from .test_patterns import CASES


@pytest.mark.parametrize("pattern", PATTERNS)
def test_backends_give_the_same_model_outputs_and_gradients(pattern: str) -> None:
    config = AttentionConfig(pattern=pattern, n_layers=2, **CASES[pattern])
    task = make_task("mqar", seq_len=96, n_pairs=4)
    x, _ = task.data("eval", 4)
    outs = {}
    for kernel in ("reference", "blocked"):
        torch.manual_seed(0)
        model = build_model(config, task, kernel=kernel)
        logits = model(x)
        assert logits.shape == (4, 96, task.n_classes)
        logits.square().mean().backward()
        outs[kernel] = (logits.detach(), model.tok_emb.weight.grad.clone())
    assert torch.allclose(outs["reference"][0], outs["blocked"][0], atol=1e-5)
    assert torch.allclose(outs["reference"][1], outs["blocked"][1], atol=1e-6)


@pytest.mark.parametrize("pattern", ["dense", "window", "longformer"])
def test_causal_model_ignores_the_future(pattern: str) -> None:
    config = AttentionConfig(pattern=pattern, n_layers=2, causal=True, **CASES[pattern])
    task = make_task("mqar", seq_len=64, n_pairs=4)
    model = build_model(config, task).eval()
    x, _ = task.data("eval", 2)
    y = x.clone()
    y[:, 40:] = (y[:, 40:] + 1) % task.vocab_size
    with torch.no_grad():
        a, b = model(x), model(y)
    assert torch.allclose(a[:, :40], b[:, :40], atol=1e-6)
    assert not torch.allclose(a[:, 40:], b[:, 40:])


def test_window_limits_how_far_information_travels() -> None:
    """One layer of window(8): position 60 cannot see position 10, even bidirectionally."""
    config = AttentionConfig(pattern="window", window=8, causal=False, n_layers=1)
    task = make_task("mqar", seq_len=64, n_pairs=4)
    model = build_model(config, task).eval()
    x, _ = task.data("eval", 1)
    y = x.clone()
    y[:, 10] = (y[:, 10] + 1) % task.vocab_size
    with torch.no_grad():
        a, b = model(x), model(y)
    assert torch.allclose(a[:, 30:], b[:, 30:], atol=1e-6)
    assert not torch.allclose(a[:, 10], b[:, 10])
