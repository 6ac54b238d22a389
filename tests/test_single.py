"""A trial of one trains the plain model the export writes (``attn_search/engine/single.py``):
chosen by the trainer, started from the member model's weights, reconfigured by a refill, and
trainable under bf16 autocast (the CUDA trial's precision; CPU float32 elsewhere)."""

from __future__ import annotations

import pytest
import torch

from attn_search import PATTERNS, AttentionConfig, Budget, build_model, evaluate, evaluate_many, make_task
from attn_search.engine.model import AttentionModel, count_params, member_losses
from attn_search.engine.plain import PatternModel
from attn_search.engine.single import SingleModel
from attn_search.engine.trainer import MemberAdamW, model_for

from .test_population import HEADS, PARAMS, TASK, member_configs


def test_the_trainer_gives_a_lone_trial_the_plain_model_and_a_population_the_member_axis() -> None:
    task = make_task("mqar", **TASK)
    c = member_configs()[0]
    assert isinstance(model_for([c], task), SingleModel)
    assert isinstance(model_for([c], task).net, PatternModel)
    assert isinstance(model_for([c, c.replace(seed=9)], task), AttentionModel)
    assert isinstance(model_for([c], task, kernel="blocked"), AttentionModel)  # a forced kernel is the engine's
    assert isinstance(model_for([c], task, member_layout="grouped"), AttentionModel)


@pytest.mark.parametrize("attn_dropout", [0.0, 0.2], ids=["no-attention-dropout", "attention-dropout"])
def test_a_lone_trial_starts_from_the_member_models_weights_and_computes_its_function(attn_dropout: float) -> None:
    """Every pattern and head count 2/4/8: the plain model of a configuration gives, at its first
    step, the logits of the member model of that configuration (same seed) to float32 rounding, and
    counts the same parameters. (Attention dropout changes the CPU path to the tiles; eval mode.)"""
    task = make_task("mqar", **TASK)
    x, _ = task.data("eval", 3)
    for c in member_configs(attn_dropout=attn_dropout):
        single, member = SingleModel(c, task).eval(), build_model(c, task).eval()
        with torch.no_grad():
            a, b = single(x.unsqueeze(0))[0], member(x)
        assert b.abs().max() > 1e-3
        assert torch.allclose(a, b, atol=2e-6), (c.pattern, c.n_heads, (a - b).abs().max())
        assert count_params(single) == count_params(member) > 0


def test_a_refill_of_a_population_of_one_retrains_from_its_own_seed_with_its_own_heads_and_pattern() -> None:
    """A population of one whose member is stopped at its first rung takes configurations of other
    head counts and patterns into its slot: each trains exactly as its own lone trial does (a refill
    that kept the old head count, pattern or weights would differ)."""
    configs = member_configs()
    first, more = configs[0], [configs[1], configs[4], configs[2]]
    assert len({c.n_heads for c in more}) > 1 and len({c.pattern for c in more}) == 3
    queue = list(more)
    budget = Budget(steps=20, rungs=2, n_eval=32, latency_batch=2)
    results = evaluate_many([first], "mqar", budget=budget, task_kwargs=TASK, device="cpu",
                            reporter=lambda member, step, acc: member == 0,
                            refill=lambda: queue.pop(0) if queue else None)  # fmt: skip
    assert results[0].state == "pruned" and [r.config for r in results[1:]] == more
    for c, r in zip(more, results[1:], strict=True):
        alone = evaluate(c, "mqar", budget=budget, task_kwargs=TASK, device="cpu")
        assert r.curve == alone.curve and r.metrics["final_loss"] == alone.metrics["final_loss"], c.describe()


@pytest.mark.parametrize("attn_dropout", [0.0, 0.1], ids=["no-attention-dropout", "attention-dropout"])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_a_lone_trials_step_runs_under_bf16_autocast(pattern: str, attn_dropout: float) -> None:
    """A training step of the plain model under bf16 autocast (how CUDA trains a trial; on CPU the
    same dtype mix reaches the tiles, SDPA over the mask and the dense path): bf16 logits, a loss
    within 5% of float32's, finite gradients on every parameter, and an optimiser step that moves
    the weights."""
    task = make_task("mqar", **TASK)
    config = AttentionConfig(d_model=32, n_heads=HEADS[1], pattern=pattern, attn_dropout=attn_dropout,
                             batch_size=8, **PARAMS)  # type: ignore[arg-type]  # fmt: skip
    x, y = (t[:8].unsqueeze(0) for t in task.data("train", 8))
    model = SingleModel(config, task)
    with torch.no_grad():
        exact = member_losses(model.eval()(x), y, 0.0).item()
    model.train()
    opt = MemberAdamW(model)
    before = opt.flat.clone()
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
    assert logits.dtype == torch.bfloat16
    loss = member_losses(logits, y, 0.0)
    if attn_dropout == 0:
        assert loss.item() == pytest.approx(exact, rel=0.05)
    loss.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    opt.step(torch.tensor([1e-3]))
    assert (opt.flat != before).any() and torch.isfinite(opt.flat).all()
