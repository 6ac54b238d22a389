"""A trial of one trains the plain model the export writes (``attn_search/engine/single.py``):
chosen by the trainer, started from the member model's weights, reconfigured by a refill, its
weights loadable into the export as they are, and trainable under bf16 autocast (the CUDA trial's
precision; CPU float32 elsewhere)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from attn_search import PATTERNS, AttentionConfig, Budget, build_model, evaluate, evaluate_many, make_task
from attn_search.engine.model import AttentionModel, count_params, member_losses
from attn_search.engine.plain import PatternAttention, PatternModel
from attn_search.engine.single import SingleModel
from attn_search.engine.trainer import model_for, train_model
from attn_search.export import python_module

from .test_population import HEADS, PARAMS, TASK, member_configs

LONG = {**TASK, "seq_len": 256}  # four 64-wide tiles a side: the CPU path's gathers do work


def test_the_trainer_gives_a_lone_trial_the_plain_model_and_a_population_the_member_axis() -> None:
    task = make_task("mqar", **TASK)
    c = member_configs()[0]
    assert isinstance(model_for([c], task), SingleModel) and isinstance(model_for([c], task), PatternModel)
    assert isinstance(model_for([c, c.replace(seed=9)], task), AttentionModel)
    assert isinstance(model_for([c], task, kernel="blocked"), AttentionModel)  # a forced kernel is the engine's
    assert isinstance(model_for([c], task, member_layout="grouped"), AttentionModel)


@pytest.mark.parametrize("attn_dropout", [0.0, 0.2], ids=["no-attention-dropout", "attention-dropout"])
def test_a_lone_trial_starts_from_the_member_models_weights_and_computes_its_function(attn_dropout: float) -> None:
    """Every pattern and head count 2/4/8 at L=256: the plain model of a configuration gives, at its
    first step, the logits of the member model of that configuration (same seed) to float32
    rounding, and counts the same parameters. (Attention dropout sends the plain model's CPU path
    to the tiles, four a side; without it, sparse patterns take the tiles or SDPA over the mask by
    density; eval mode.)"""
    task = make_task("mqar", **LONG)
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


def test_a_refill_takes_the_new_configurations_rates() -> None:
    """Dropout and attention dropout of a refilled slot are the new configuration's (a refill that
    kept the old rates would regularise the new trial as the old one)."""
    task = make_task("mqar", **TASK)
    model = SingleModel(member_configs()[0], task)
    model.set_member(0, member_configs()[3].replace(dropout=0.3, attn_dropout=0.2))
    drops = [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    attns = [m for m in model.modules() if isinstance(m, PatternAttention)]
    assert len(drops) == 1 + 2 * len(attns) and set(drops) == {0.3}
    assert {(a.attn_dropout, a.n_heads) for a in attns} == {(0.2, member_configs()[3].n_heads)}


def test_a_lone_trials_weights_load_into_the_exported_module_as_they_are(tmp_path: Path) -> None:
    """``load_searched`` takes a lone trial's state dict (a plain model's: no member axis, linear
    weights ``(out, in)``) as well as a population's: the exported model then computes the trial's
    logits, loaded by ``importlib`` without registering the module."""
    config, task = member_configs()[1], make_task("mqar", **TASK)
    trained, _ = train_model(config, task, budget=Budget(steps=4, rungs=1, n_eval=8, latency_batch=2), device="cpu")
    path = tmp_path / "exported.py"
    path.write_text(
        python_module(config, vocab_size=task.vocab_size, n_classes=task.n_classes, max_len=TASK["seq_len"])
    )
    spec = importlib.util.spec_from_file_location("exported_lone", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    theirs = module.build_model().eval()
    module.load_searched(theirs, trained.state_dict())
    x, _ = task.data("eval", 4)
    with torch.no_grad():
        ours = trained(x)
        assert torch.allclose(theirs(x), ours, atol=1e-6)
        assert not torch.allclose(SingleModel(config, task).eval()(x), ours, atol=1e-3)  # (training moved it)


@pytest.mark.parametrize("attn_dropout", [0.0, 0.1], ids=["no-attention-dropout", "attention-dropout"])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_a_lone_trials_step_runs_under_bf16_autocast_like_float32(pattern: str, attn_dropout: float) -> None:
    """A training step of the plain model under bf16 autocast (how CUDA trains a trial; on the CPU
    the same dtype mix reaches the tiles, four a side at L=256, SDPA over the mask and the dense
    path), against the same step in float32 with the same dropout draws: the loss within 0.1% and the
    first attention layer's gradient within 2% (relative norm), all gradients finite."""
    task = make_task("mqar", **LONG)
    config = AttentionConfig(d_model=32, n_heads=HEADS[1], pattern=pattern, attn_dropout=attn_dropout,
                             batch_size=8, **PARAMS)  # type: ignore[arg-type]  # fmt: skip
    x, y = (t[:8].unsqueeze(0) for t in task.data("train", 8))
    model = SingleModel(config, task).train()

    def step(bf16: bool) -> tuple[float, torch.Tensor]:
        model.zero_grad()
        torch.manual_seed(0)  # the same DropKey draws in both precisions
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = member_losses(model(x), y, 0.0).sum()
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
        return loss.item(), model.blocks[0].attn.qkv.weight.grad.clone()  # type: ignore[union-attr]

    (exact, g32), (half, g16) = step(False), step(True)
    assert g32.norm() > 1e-4
    assert half == pytest.approx(exact, rel=1e-3)
    assert ((g16 - g32).norm() / g32.norm()).item() < 0.02  # (measured: 0.3-0.4%)


def test_the_plain_models_flex_path_compiles_once_for_every_dropout_rate_and_pattern(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A lone trial's CUDA path (FlexAttention over the pattern's BlockMask, DropKey in the kernel),
    run forward on the CPU: refills bring other attention-dropout rates and patterns, and the
    kernel is compiled once. (A rate baked into the kernel as a constant compiled a kernel per rate,
    and past dynamo's limit of 8 fell back to eager attention silently.) The rate takes effect.
    Dynamo's graph capture is what recompiles, so the counting backend runs the captured graph as
    it is: inductor's CPU build of the kernel takes about 10 minutes and adds nothing here."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from attn_search.engine import plain
    from attn_search.engine.patterns import pattern_mask
    from attn_search.engine.single import rule_factory

    compiles = {"n": 0}

    def counting(gm: torch.fx.GraphModule, inputs: list[torch.Tensor]) -> object:
        compiles["n"] += 1
        return gm.forward

    torch._dynamo.reset()
    monkeypatch.setattr(plain, "_FLEX", torch.compile(flex_attention, dynamic=False, backend=counting))
    L = 128
    layer = PatternAttention(32, 2, rule_factory(AttentionConfig(pattern="window", window=8)))
    q, k, v = (torch.randn(2, 2, L, 16) for _ in range(3))
    block_mask = {p: create_block_mask(plain.table_mask_mod(pattern_mask(p, L, causal=True, **PARAMS)), None, None,
                                       L, L, device="cpu") for p in ("window", "bigbird", "dilated")}  # fmt: skip
    outs = {}
    with torch.no_grad():
        for pattern, rate in (("window", 0.05), ("window", 0.5), ("bigbird", 0.1), ("dilated", 0.3), ("window", 0.2)):
            outs[pattern, rate] = layer.flex((q, k, v), block_mask[pattern], 0.25, rate)
        assert compiles["n"] == 1
        undropped = layer.flex((q, k, v), block_mask["window"], 0.25, 0.0)
    near, far = ((outs["window", r] - undropped).norm() for r in (0.05, 0.5))
    assert 0 < near < far
