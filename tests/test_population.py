"""Population training: a fused member equals its unfused twin, and a population reproduces the
one-by-one trials of its members (CPU, float32)."""

from __future__ import annotations

import pytest
import torch

from attn_search import PATTERNS, AttentionConfig, Budget, build_model, evaluate, make_task
from attn_search.engine.population import MemberAdamW, PopulationModel, _mask, evaluate_many
from attn_search.engine.trainer import make_optimizer

TASK = {"seq_len": 64, "n_pairs": 8, "n_keys": 16, "n_values": 8}
PARAMS = {"window": 6, "dilation": 2, "stride": 5, "block_size": 8, "n_global": 1, "n_random": 1}


def member_configs(**common: object) -> list[AttentionConfig]:
    """One member per pattern, each with its own lr, weight decay, label smoothing and seed."""
    out = []
    for i, pattern in enumerate(PATTERNS):
        out.append(AttentionConfig(d_model=32, n_heads=2, pattern=pattern, lr=3e-3 + 1e-3 * i,
                                   weight_decay=0.01 * i, label_smoothing=0.02 * i, warmup_steps=2 + i, seed=i,
                                   batch_size=8, **PARAMS, **common))  # type: ignore[arg-type]  # fmt: skip
    return out


def population(configs: list[AttentionConfig], L: int) -> tuple[PopulationModel, list[torch.nn.Module]]:
    task = make_task("mqar", **TASK)
    models = []
    for c in configs:
        torch.manual_seed(c.seed)
        models.append(build_model(c, task, backend="reference"))
    masks = torch.stack([_mask(c, L) for c in configs])
    return PopulationModel(models, masks), models


def test_a_fused_member_equals_its_unfused_twin() -> None:
    configs = member_configs()
    pop, models = population(configs, 64)
    x, _ = make_task("mqar", **TASK).data("eval", 3)
    zero = torch.zeros(len(configs))
    with torch.no_grad():
        fused = pop.eval()(x.unsqueeze(0).expand(len(configs), -1, -1), dropout=zero, attn_dropout=zero)
        for k, m in enumerate(models):
            assert torch.allclose(fused[k], m.eval()(x), atol=1e-5), configs[k].pattern


def test_one_step_of_member_adamw_equals_torch_adamw() -> None:
    configs = member_configs()
    pop, models = population(configs, 64)
    x, y = make_task("mqar", **TASK).data("train", 4)
    K = len(configs)
    opt = MemberAdamW(pop, torch.tensor([c.weight_decay for c in configs]))
    from attn_search.engine.model import loss_fn
    from attn_search.engine.population import _clip_per_member, _member_loss

    for _ in range(2):
        zero = torch.zeros(K)
        losses = _member_loss(pop(x.unsqueeze(0).expand(K, -1, -1), dropout=zero, attn_dropout=zero),
                              y.unsqueeze(0).expand(K, -1, -1), torch.tensor([c.label_smoothing for c in configs]))  # fmt: skip
        opt.zero_grad()
        losses.sum().backward()
        _clip_per_member(pop)
        opt.step(torch.tensor([c.lr for c in configs]))
    for k, (c, m) in enumerate(zip(configs, models, strict=True)):
        torch_opt = make_optimizer(m, c)
        for _ in range(2):
            loss = loss_fn(m(x), y, label_smoothing=c.label_smoothing)
            torch_opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            torch_opt.step()
        assert torch.allclose(pop.p("head_w")[k], m.head.weight.t(), atol=1e-5), c.pattern
        assert torch.allclose(pop.p("qkv0_w")[k], m.blocks[0].attn.qkv.weight.t(), atol=1e-5), c.pattern  # type: ignore[union-attr]
        assert torch.allclose(pop.tok_emb[k], m.tok_emb.weight, atol=1e-5), c.pattern


BUDGET = Budget(steps=60, rungs=3, n_eval=128, latency_batch=2)


def test_a_population_reproduces_its_members_one_by_one() -> None:
    """Every pattern, members with different lr, weight decay, warm-up, label smoothing and seed:
    accuracy at every rung within 0.03 of the member's own ``evaluate`` (float32, CPU)."""
    configs = member_configs()
    together = evaluate_many(configs, "mqar", budget=BUDGET, task_kwargs=TASK, device="cpu")
    for c, r in zip(configs, together, strict=True):
        alone = evaluate(c, "mqar", budget=BUDGET, task_kwargs=TASK, device="cpu")
        assert r.state == alone.state == "complete" and r.config == c
        assert [s for s, _ in r.curve] == [s for s, _ in alone.curve]
        for (_, a), (_, b) in zip(r.curve, alone.curve, strict=True):
            assert abs(a - b) <= 0.03, (c.pattern, r.curve, alone.curve)
        assert r.metrics["flops"] == alone.metrics["flops"] and r.metrics["params"] == alone.metrics["params"]


def test_dropout_members_agree_statistically() -> None:
    """Dropout masks come from the population's generator, not each trial's: accuracy agrees
    within 0.1 at the last rung (the run-to-run spread of dropout on this budget)."""
    configs = [c.replace(dropout=0.1, attn_dropout=0.1) for c in member_configs()[:3]]
    together = evaluate_many(configs, "mqar", budget=BUDGET, task_kwargs=TASK, device="cpu")
    for c, r in zip(configs, together, strict=True):
        alone = evaluate(c, "mqar", budget=BUDGET, task_kwargs=TASK, device="cpu")
        assert abs(r.metrics["accuracy"] - alone.metrics["accuracy"]) <= 0.1, (c.pattern, r.curve, alone.curve)


def test_a_member_stopped_by_the_reporter_leaves_and_the_others_go_on() -> None:
    configs = member_configs()[:3]
    seen: list[tuple[int, int]] = []

    def reporter(member: int, step: int, accuracy: float) -> bool:
        seen.append((member, step))
        return member == 1  # stop the second member at its first rung

    results = evaluate_many(configs, "mqar", budget=BUDGET, task_kwargs=TASK, device="cpu", reporter=reporter)
    assert [r.state for r in results] == ["complete", "pruned", "complete"]
    assert results[1].metrics["steps"] == 20 and results[0].metrics["steps"] == 60
    assert [s for m, s in seen if m == 1] == [20] and [s for m, s in seen if m == 0] == [20, 40, 60]


def test_members_of_other_shapes_form_their_own_populations_in_order() -> None:
    configs = [*member_configs()[:2], AttentionConfig(d_model=16, n_heads=2, pattern="window", window=4, batch_size=8)]
    results = evaluate_many(configs, "mqar", budget=Budget(steps=4, rungs=1, n_eval=32, latency_batch=2),
                            task_kwargs=TASK, device="cpu")  # fmt: skip
    assert [r.config for r in results] == configs
    assert all(r.state == "complete" for r in results)


def test_evaluate_many_leaves_the_callers_random_state_alone() -> None:
    torch.manual_seed(7)
    before = torch.get_rng_state()
    evaluate_many(member_configs()[:2], "mqar", budget=Budget(steps=2, rungs=1, n_eval=16, latency_batch=2),
                  task_kwargs=TASK, device="cpu")  # fmt: skip
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("bad", [0.0])
def test_member_dropout_is_identity_at_zero(bad: float) -> None:
    from attn_search.engine.population import _dropout

    x = torch.randn(3, 2, 4, 5)
    assert torch.equal(_dropout(x, torch.full((3,), bad), None), x)


def test_members_that_diverge_fail_alone_and_a_population_that_all_diverges_ends() -> None:
    configs = member_configs()[:3]
    configs[1] = configs[1].replace(lr=1e6)  # diverges
    results = evaluate_many(configs, "mqar", budget=Budget(steps=20, rungs=2, n_eval=32, latency_batch=2),
                            task_kwargs=TASK, device="cpu")  # fmt: skip
    assert [r.state for r in results] == ["complete", "failed", "complete"]
    assert "non-finite training loss" in str(results[1].reason)
    every = evaluate_many([c.replace(lr=1e6) for c in configs], "mqar", budget=Budget(steps=20, rungs=2, n_eval=32,
                          latency_batch=2), task_kwargs=TASK, device="cpu")  # fmt: skip
    assert all(r.state == "failed" for r in every) and all(r.metrics["steps"] < 20 for r in every)


def test_the_member_mask_mod_is_pointwise_with_its_table_on_the_query_device() -> None:
    """The population's mask_mod must lower as a pointwise subgraph on CUDA (no copy, reduction or
    new buffer; the table already on the device): ``meta`` stands in for CUDA, as in test_patterns.
    On CPU the rule must also read the right member's row, clamping positions past the end."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from attn_search.engine.population import member_mask_mod

    from .test_patterns import _captured_tensors

    configs = member_configs()
    masks = torch.stack([_mask(c, 64) for c in configs])
    rule = member_mask_mod(masks.to("meta"))
    assert [t.device.type for t in _captured_tensors(rule)] == ["meta"]
    calls: list[str] = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            calls.append(str(func.overloadpacket.__name__))
            return func(*args, **(kwargs or {}))

    b, q, kv = (torch.tensor(v, device="meta") for v in ([0, 3, 5], [70, 5, 63], [3, 5, 60]))
    with Record():
        out = rule(b, torch.zeros_like(b), q, kv)
    assert out.dtype == torch.bool and out.shape == (3,)
    forbidden = {"_to_copy", "copy_", "clone", "to", "sum", "any", "all", "nonzero", "empty", "zeros", "ones", "cat"}
    assert not forbidden & set(calls), sorted(forbidden & set(calls))
    cpu_rule = member_mask_mod(masks)
    members, qs, kvs = torch.meshgrid(torch.arange(len(configs)), torch.arange(64), torch.arange(64), indexing="ij")
    assert torch.equal(cpu_rule(members, members, qs, kvs), masks)
    assert torch.equal(cpu_rule(torch.tensor([2]), torch.tensor([0]), torch.tensor([90]), torch.tensor([63])),
                       masks[2, 63, 63].reshape(1))  # fmt: skip


def test_training_reads_losses_from_the_device_at_checks_not_every_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA every read of a tensor's value (``tolist``, ``item``) makes the host wait for the GPU.
    A population must not read its losses at every step: counted here on the CPU, over 120 steps
    with 2 rungs, the reads stay a handful (rungs, the end, every SYNC_EVERY steps)."""
    from attn_search.engine.population import SYNC_EVERY

    reads = {"n": 0}
    for name in ("tolist", "item"):
        real = getattr(torch.Tensor, name)

        def counted(self: torch.Tensor, *a: object, _real: object = real, **k: object) -> object:
            reads["n"] += 1
            return _real(self, *a, **k)  # type: ignore[operator]

        monkeypatch.setattr(torch.Tensor, name, counted)
    configs = member_configs()[:3]
    steps = 120
    results = evaluate_many(configs, "mqar", budget=Budget(steps=steps, rungs=2, n_eval=32, latency_batch=2),
                            task_kwargs=TASK, device="cpu")  # fmt: skip
    assert all(r.state == "complete" and r.metrics["steps"] == steps for r in results)
    checks = 2 + steps // SYNC_EVERY + 1
    assert reads["n"] <= 3 * checks + 10, f"{reads['n']} reads of device values in {steps} steps"
