from __future__ import annotations

import math

import pytest
import torch

from attn_search import AttentionConfig, Budget, StopTrial, TrialResult, evaluate
from attn_search.engine.trainer import lr_factor, resolve_device

TINY = Budget(steps=12, rungs=3, n_eval=32, latency_batch=2)
TASK = {"seq_len": 64, "n_pairs": 8}
REQUIRED = {"accuracy", "flops", "params", "latency_ms", "peak_mem_mb", "train_seconds"}


def run(config: AttentionConfig | dict, **kwargs: object) -> TrialResult:
    return evaluate(config, "mqar", budget=TINY, task_kwargs=TASK, **kwargs)  # type: ignore[arg-type]


def test_result_has_metrics_and_curve() -> None:
    r = run({"pattern": "window", "window": 16})
    assert r.state == "complete" and r.reason is None
    assert set(r.metrics) >= REQUIRED
    assert [s for s, _ in r.curve] == [4, 8, 12]
    assert r.metrics["accuracy"] == r.curve[-1][1]
    assert 0 <= r.metrics["accuracy"] <= 1
    assert r.metrics["flops"] > 0 and r.metrics["params"] > 0 and r.metrics["latency_ms"] > 0
    assert r.metrics["peak_mem_mb"] > 0 and r.metrics["train_seconds"] > 0
    assert r.device == "cpu" and r.task == "mqar"
    assert TrialResult.from_dict(r.to_dict()) == r


def test_same_seed_same_metrics_on_cpu() -> None:
    cfg = {"pattern": "bigbird", "block_size": 8, "dropout": 0.1, "attn_dropout": 0.1}
    a, b = run(cfg), run(cfg)
    assert a.curve == b.curve
    assert a.metrics["final_loss"] == b.metrics["final_loss"]
    c = run(cfg, seed=1)
    assert c.metrics["final_loss"] != a.metrics["final_loss"]


def test_reporter_sees_rungs_and_can_stop() -> None:
    seen: list[tuple[int, float]] = []

    def reporter(step: int, acc: float) -> bool:
        seen.append((step, acc))
        return step >= 8

    r = run({}, reporter=reporter)
    assert r.state == "pruned" and "step 8" in (r.reason or "")
    assert [s for s, _ in seen] == [4, 8] and r.curve == seen
    assert r.metrics["steps"] == 8


def test_reporter_may_raise_stop_trial() -> None:
    def reporter(step: int, acc: float) -> None:
        raise StopTrial("pruned by the scheduler")

    r = run({}, reporter=reporter)
    assert r.state == "pruned" and r.reason == "pruned by the scheduler" and len(r.curve) == 1


def test_non_finite_loss_fails_the_trial_without_crashing() -> None:
    r = run({"lr": 1e6})
    assert r.state == "failed"
    assert "non-finite training loss" in (r.reason or "")
    assert math.isnan(r.metrics["final_loss"]) or math.isinf(r.metrics["final_loss"])


def test_budget_and_device_errors() -> None:
    with pytest.raises(ValueError, match="budget preset 'huge' is unknown"):
        evaluate({}, budget="huge")
    with pytest.raises(ValueError, match="steps, rungs"):
        Budget(steps=0)
    with pytest.raises(ValueError, match="device='tpu' is unknown"):
        resolve_device("tpu")


def test_time_limit_stops_training_with_a_final_evaluation() -> None:
    r = evaluate({}, "mqar", budget=Budget(steps=10_000, rungs=2, n_eval=16, time_limit_s=0.5), task_kwargs=TASK)
    assert r.state == "complete" and "time limit" in (r.reason or "")
    assert r.metrics["steps"] < 10_000 and r.curve[-1][0] == r.metrics["steps"]


def test_lr_schedule_warms_up_then_decays_to_a_tenth() -> None:
    assert lr_factor(0, warmup=10, total=100) == pytest.approx(0.1)
    assert lr_factor(9, warmup=10, total=100) == pytest.approx(1.0)
    assert lr_factor(10, warmup=10, total=100) == pytest.approx(1.0)
    assert lr_factor(100, warmup=10, total=100) == pytest.approx(0.1)


@pytest.mark.slow
def test_default_budget_learns_the_default_task() -> None:
    r = evaluate({"pattern": "dense"})
    assert r.metrics["accuracy"] > 0.9, r.curve


def test_training_learns_recall_that_only_a_long_enough_reach_can_do() -> None:
    """A few seconds of real training in the default suite: on a tiny MQAR whose key-query
    distances are uniform over the sequence, dense attention learns recall and a 4-key window,
    shorter than almost every distance, stays near chance (1/16)."""
    task = {"seq_len": 64, "n_pairs": 8, "n_keys": 16, "n_values": 16, "distance": "uniform"}
    budget = Budget(steps=120, rungs=2, n_eval=256, latency_batch=2)
    dense, window = (
        evaluate(AttentionConfig(d_model=32, n_heads=2, lr=0.01, **c), budget=budget, device="cpu", task_kwargs=task)
        for c in ({"pattern": "dense"}, {"pattern": "window", "window": 4})
    )
    assert dense.metrics["accuracy"] > 0.9, dense.curve
    assert window.metrics["accuracy"] < 0.2, window.curve


def test_evaluate_leaves_the_callers_random_state_alone() -> None:
    """An RL agent samples its actions from torch's global generator: a trial seeding and drawing
    from it would make the agent repeat itself (it proposed 2 distinct configurations in 12)."""
    torch.manual_seed(123)
    before = torch.get_rng_state()
    result = evaluate(AttentionConfig(d_model=16, pattern="window", window=4, dropout=0.1), "mqar",
                      budget=4, task_kwargs={"seq_len": 32, "n_pairs": 4, "n_keys": 8, "n_values": 8})  # fmt: skip
    assert result.state == "complete"
    assert torch.equal(torch.get_rng_state(), before)
