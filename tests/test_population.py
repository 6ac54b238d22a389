"""Populations: one model with a member axis trains K configurations as one. A fused member equals
its unfused twin (whatever its head count), the optimiser equals torch's AdamW, a population
reproduces its members' one-by-one trials, freed slots are refilled while the others train on,
and the steps between rungs read nothing from the device (CPU, float32)."""

from __future__ import annotations

import pytest
import torch

from attn_search import PATTERNS, AttentionConfig, Budget, build_model, evaluate, evaluate_many, make_task
from attn_search.engine import trainer as trainer_module
from attn_search.engine.attention import member_mask_mod
from attn_search.engine.model import member_losses
from attn_search.engine.patterns import pattern_mask
from attn_search.engine.trainer import MemberAdamW

TASK = {"seq_len": 64, "n_pairs": 8, "n_keys": 16, "n_values": 8}
PARAMS = {"window": 6, "dilation": 2, "stride": 5, "block_size": 8, "n_global": 1, "n_random": 1}
HEADS = (2, 4, 8)


def member_configs(**common: object) -> list[AttentionConfig]:
    """One member per pattern, each with its own head count, lr, weight decay, label smoothing and seed."""
    out = []
    for i, pattern in enumerate(PATTERNS):
        out.append(AttentionConfig(d_model=32, n_heads=HEADS[i % 3], pattern=pattern, lr=3e-3 + 1e-3 * i,
                                   weight_decay=0.01 * i, label_smoothing=0.02 * i, warmup_steps=2 + i, seed=i,
                                   batch_size=8, **PARAMS, **common))  # type: ignore[arg-type]  # fmt: skip
    return out


@pytest.mark.parametrize(
    ("per_member", "kernel"),
    [(True, "auto"), (False, "auto"), pytest.param(False, "flex", marks=pytest.mark.slow)],  # (flex compiles: 15 s)
    ids=["cpu-per-member", "grouped-layout-dense", "grouped-layout-flex"],
)
def test_a_fused_member_equals_its_unfused_twin(per_member: bool, kernel: str) -> None:
    """Every pattern and head count 2, 4 and 8 in one model: each member's logits are those of the
    model of its configuration alone (the single-pattern attention paths), to float32 rounding,
    through the CPU's per-member path and through the grouped head layout CUDA uses, on its dense
    path (members gathered per group) and on FlexAttention's (every group's kernel over all
    members, the others masked out by their BlockMask; forward only on the CPU). A member reading
    another's mask row, group, scale or rotary table, or a group's kernel leaking into another
    group's members, would be far off."""
    configs = member_configs()
    task = make_task("mqar", **TASK)
    fused = build_model(configs, task, kernel=kernel, member_layout="auto" if per_member else "grouped").eval()
    x, _ = task.data("eval", 3)
    with torch.no_grad():
        out = fused(x.unsqueeze(0).expand(len(configs), -1, -1))  # (K, B, L, n)
        plan = fused.blocks[0].attn._plan(TASK["seq_len"], x.device)
        assert (kernel == "flex") == (getattr(plan, "block_masks", None) is not None)
        for k, c in enumerate(configs):
            alone = build_model(c, task).eval()(x)
            assert alone.abs().max() > 1e-3
            assert torch.allclose(out[k], alone, atol=2e-6), (c.pattern, c.n_heads, (out[k] - alone).abs().max())


def test_member_adamw_equals_torch_adamw_with_clipping() -> None:
    """Given the same gradients, each member's update is torch's AdamW (weight decay on matrices
    only) after ``clip_grad_norm_(1.0)``, with the member's own lr and weight decay, step after step."""
    configs = member_configs()[:4]
    task = make_task("mqar", **TASK)
    x, y = task.data("train", 4)
    K = len(configs)
    fused = build_model(configs, task, kernel="reference")
    opt = MemberAdamW(fused)
    twins, twin_opts = [], []
    for c in configs:
        model = build_model(c, task, kernel="reference")
        decay = [p for n, p in model.named_parameters() if p.dim() >= 3 and "emb" not in n]
        rest = [p for n, p in model.named_parameters() if not (p.dim() >= 3 and "emb" not in n)]
        twins.append(model)
        twin_opts.append(torch.optim.AdamW([{"params": decay, "weight_decay": c.weight_decay},
                                            {"params": rest, "weight_decay": 0.0}], lr=c.lr, betas=(0.9, 0.98)))  # fmt: skip
    for _ in range(3):
        losses = member_losses(fused(x.expand(K, -1, -1)), y.expand(K, -1, -1),
                               torch.tensor([c.label_smoothing for c in configs]))  # fmt: skip
        opt.zero_grad()
        losses.sum().backward()
        grads = [p.grad.clone() for p in fused.parameters()]  # type: ignore[union-attr]
        opt.step(torch.tensor([c.lr for c in configs]))
        for k, (model, torch_opt) in enumerate(zip(twins, twin_opts, strict=True)):
            for p, g in zip(model.parameters(), grads, strict=True):
                p.grad = g[k : k + 1].clone()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            torch_opt.step()
    for k, (c, model) in enumerate(zip(configs, twins, strict=True)):
        for (name, p), q in zip(model.named_parameters(), fused.parameters(), strict=True):
            assert torch.allclose(p[0], q[k], atol=1e-7, rtol=1e-5), (c.pattern, name)
        assert not torch.equal(model.blocks[0].fc.weight, build_model(c, task).blocks[0].fc.weight)  # it trained


BUDGET = Budget(steps=60, rungs=3, n_eval=128, latency_batch=2)


def assert_same_training(together: object, alone: object) -> None:
    r, a = together, alone
    assert r.state == a.state and r.config == a.config  # type: ignore[attr-defined]
    assert [s for s, _ in r.curve] == [s for s, _ in a.curve]  # type: ignore[attr-defined]
    for (_, x), (_, y) in zip(r.curve, a.curve, strict=True):  # type: ignore[attr-defined]
        assert abs(x - y) <= 0.01, (r.config.pattern, r.curve, a.curve)  # type: ignore[attr-defined]
    assert r.metrics["final_loss"] == pytest.approx(a.metrics["final_loss"], rel=1e-3)  # type: ignore[attr-defined]
    assert r.metrics["flops"] == a.metrics["flops"] and r.metrics["params"] == a.metrics["params"]  # type: ignore[attr-defined]


def test_a_population_reproduces_its_members_one_by_one() -> None:
    """Every pattern, head counts 2/4/8, members with their own lr, weight decay, warm-up, label
    smoothing and seed, all in one population: every rung and the final loss as trained alone."""
    configs = member_configs()
    together = evaluate_many(configs, "mqar", budget=BUDGET, task_kwargs=TASK, device="cpu")
    for c, r in zip(configs, together, strict=True):
        assert_same_training(r, evaluate(c, "mqar", budget=BUDGET, task_kwargs=TASK, device="cpu"))


def test_freed_slots_are_refilled_and_refills_train_as_they_would_alone() -> None:
    """Continuous batching: a population of 2; member 1 is stopped at its first rung, and the slots
    freed then and later take the next configurations from step 0 while member 0 trains on. Every
    member, refilled ones included, trains exactly as it would alone (its own step counter,
    schedule, data order, rungs and fresh optimiser state), and results arrive as members end."""
    configs = member_configs()
    first, more = configs[:2], configs[2:5]
    queue = list(more)
    order: list[int] = []
    seen: list[tuple[int, int]] = []

    def reporter(member: int, step: int, accuracy: float) -> bool:
        seen.append((member, step))
        return member == 1

    results = evaluate_many(first, "mqar", budget=BUDGET, task_kwargs=TASK, device="cpu", reporter=reporter,
                            refill=lambda: queue.pop(0) if queue else None,
                            on_result=lambda member, result: order.append(member))  # fmt: skip
    assert [r.config for r in results] == [*first, *more]
    assert order[0] == 1 and sorted(order) == [0, 1, 2, 3, 4]
    assert results[1].state == "pruned" and results[1].metrics["steps"] == 20
    assert [s for m, s in seen if m == 2] == [20, 40, 60]  # its own steps, not the population's
    for i in (0, 2, 3, 4):
        assert_same_training(results[i], evaluate(results[i].config, "mqar", budget=BUDGET, task_kwargs=TASK,
                                                  device="cpu"))  # fmt: skip


def test_with_nothing_to_refill_a_population_shrinks_and_its_survivors_train_on_as_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two of three members stopped at the first rung and no refill: their slots are cut out (on
    the CPU at once) and the survivor trains on exactly as it would alone."""
    from attn_search.engine.model import AttentionModel

    kept: list[list[int]] = []
    real = AttentionModel.keep_members
    monkeypatch.setattr(AttentionModel, "keep_members", lambda self, slots: kept.append(slots) or real(self, slots))
    configs = member_configs()[:3]
    results = evaluate_many(configs, "mqar", budget=BUDGET, task_kwargs=TASK, device="cpu",
                            reporter=lambda member, step, accuracy: member != 1)  # fmt: skip
    assert [r.state for r in results] == ["pruned", "complete", "pruned"]
    assert kept == [[1]]
    assert_same_training(results[1], evaluate(configs[1], "mqar", budget=BUDGET, task_kwargs=TASK, device="cpu"))


def test_a_refill_of_another_shape_waits_for_its_own_population() -> None:
    configs = member_configs()[:2]
    wide = AttentionConfig(d_model=16, n_heads=2, pattern="window", window=4, batch_size=8)
    queue = [wide, configs[0].replace(seed=9)]
    budget = Budget(steps=4, rungs=1, n_eval=32, latency_batch=2)
    results = evaluate_many(configs, "mqar", budget=budget, task_kwargs=TASK, device="cpu",
                            refill=lambda: queue.pop(0) if queue else None)  # fmt: skip
    assert [r.config for r in results] == [*configs, wide, configs[0].replace(seed=9)]
    assert all(r.state == "complete" for r in results)


def test_dropout_members_agree_statistically() -> None:
    """Dropout masks are drawn for the population, not each trial: accuracy agrees within 0.1 at
    the last rung (the run-to-run spread of dropout on this budget)."""
    configs = [c.replace(dropout=0.1, attn_dropout=0.1) for c in member_configs()[:3]]
    together = evaluate_many(configs, "mqar", budget=BUDGET, task_kwargs=TASK, device="cpu")
    for c, r in zip(configs, together, strict=True):
        alone = evaluate(c, "mqar", budget=BUDGET, task_kwargs=TASK, device="cpu")
        assert abs(r.metrics["accuracy"] - alone.metrics["accuracy"]) <= 0.1, (c.pattern, r.curve, alone.curve)


@pytest.mark.slow  # about 15 s a layout: 36 short trainings
@pytest.mark.parametrize("per_member", [True, False], ids=["cpu-per-member", "grouped-layout-of-cuda"])
def test_a_member_with_attention_dropout_trains_like_its_lone_twin(per_member: bool) -> None:
    """DropKey (attention dropout) in a population is the same regulariser as in a lone trial,
    through the CPU's per-member path and the grouped head layout CUDA runs (its dense DropKey mask
    stands in for the kernel's hash). The draws differ, so this is statistical: over 6 seeds the
    population's mean final loss is within 3 standard errors of the lone trials', and much nearer
    to them than to the same seeds without attention dropout (a population that ignored or doubled
    the rate would sit at or past those)."""
    layout = "auto" if per_member else "grouped"
    budget = Budget(steps=40, rungs=1, n_eval=64, latency_batch=2)
    base = AttentionConfig(d_model=32, n_heads=2, pattern="dense", lr=8e-3, batch_size=8, attn_dropout=0.9)
    other = AttentionConfig(d_model=32, n_heads=4, pattern="window", window=8, lr=5e-3, batch_size=8, seed=50)
    runs: dict[str, list[float]] = {"together": [], "alone": [], "undropped": []}
    for seed in range(6):
        c = base.replace(seed=seed)
        loss = lambda r: r.metrics["final_loss"]  # noqa: E731
        runs["together"].append(
            loss(
                evaluate_many([c, other], "mqar", budget=budget, task_kwargs=TASK, device="cpu", member_layout=layout)[
                    0
                ]
            )
        )
        runs["alone"].append(loss(evaluate(c, "mqar", budget=budget, task_kwargs=TASK, device="cpu")))
        runs["undropped"].append(loss(evaluate(c.replace(attn_dropout=0.0), "mqar", budget=budget, task_kwargs=TASK,
                                               device="cpu")))  # fmt: skip
    t, a, u = (torch.tensor(v) for v in runs.values())
    se = ((t.var() + a.var()) / 6).sqrt()
    assert abs(t.mean() - a.mean()) < 3 * se, runs
    assert abs(t.mean() - a.mean()) < abs(t.mean() - u.mean()) / 2, runs


def test_evaluate_many_leaves_the_callers_random_state_alone() -> None:
    torch.manual_seed(7)
    before = torch.get_rng_state()
    evaluate_many(member_configs()[:2], "mqar", budget=Budget(steps=2, rungs=1, n_eval=16, latency_batch=2),
                  task_kwargs=TASK, device="cpu")  # fmt: skip
    assert torch.equal(torch.get_rng_state(), before)


def test_members_that_diverge_fail_alone_at_the_step_they_diverged() -> None:
    configs = member_configs()[:3]
    configs[1] = configs[1].replace(lr=1e6)  # diverges
    budget = Budget(steps=20, rungs=2, n_eval=32, latency_batch=2)
    results = evaluate_many(configs, "mqar", budget=budget, task_kwargs=TASK, device="cpu")
    assert [r.state for r in results] == ["complete", "failed", "complete"]
    assert "non-finite training loss" in str(results[1].reason) and results[1].metrics["steps"] < 10
    every = evaluate_many([c.replace(lr=1e6) for c in configs], "mqar", budget=budget, task_kwargs=TASK, device="cpu")
    assert all(r.state == "failed" for r in every) and all(r.metrics["steps"] < 20 for r in every)


def test_the_member_mask_mod_is_pointwise_with_its_table_on_the_query_device() -> None:
    """The members' mask_mod must lower as a pointwise subgraph on CUDA (no copy, reduction or
    new buffer; the table already on the device): ``meta`` stands in for CUDA, as in test_patterns.
    So must a head group's (its members table on the device too). On CPU the rule must also read
    the right member's row, clamping positions past the end, and a group's rule nothing of the
    other groups' members."""
    configs = member_configs()
    masks = torch.stack([pattern_mask(c.pattern, 64, **c.pattern_params()) for c in configs])
    group = torch.tensor([c.n_heads == 4 for c in configs])  # a head group's members
    for rule in (member_mask_mod(masks.to("meta")), member_mask_mod(masks.to("meta"), group.to("meta"))):
        _assert_pointwise_on_meta(rule)
    cpu_rule = member_mask_mod(masks)
    members, qs, kvs = torch.meshgrid(torch.arange(len(configs)), torch.arange(64), torch.arange(64), indexing="ij")
    assert torch.equal(cpu_rule(members, members, qs, kvs), masks)
    assert torch.equal(cpu_rule(torch.tensor([2]), torch.tensor([0]), torch.tensor([90]), torch.tensor([63])),
                       masks[2, 63, 63].reshape(1))  # fmt: skip
    group_rule = member_mask_mod(masks, group)  # the other groups' members see nothing
    assert torch.equal(group_rule(members, members, qs, kvs), masks & group[:, None, None])
    assert 0 < int(group.sum()) < len(configs) and masks[~group].any()


def _assert_pointwise_on_meta(rule: object) -> None:
    from torch.utils._python_dispatch import TorchDispatchMode

    from .test_patterns import _captured_tensors

    assert {t.device.type for t in _captured_tensors(rule)} == {"meta"}
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


def test_no_host_sync_between_rungs(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA every read of a tensor's value (``tolist``, ``item``, ``bool``, ``float``) makes the
    host wait for the GPU. Counted on the CPU for a population and for a single trial: every read
    happens at a check (a rung; every SYNC_EVERY steps), none in the steps between."""
    steps_done = {"n": 0}
    reads: list[int] = []
    real_step = trainer_module.Population.train_step

    def counted_step(self: object) -> torch.Tensor:
        steps_done["n"] += 1
        return real_step(self)  # type: ignore[arg-type]

    monkeypatch.setattr(trainer_module.Population, "train_step", counted_step)
    for name in ("tolist", "item", "__bool__", "__float__", "__int__"):
        real = getattr(torch.Tensor, name)

        def read(self: torch.Tensor, *a: object, _real: object = real, **k: object) -> object:
            reads.append(steps_done["n"])
            return _real(self, *a, **k)  # type: ignore[operator]

        monkeypatch.setattr(torch.Tensor, name, read)
    budget = Budget(steps=60, rungs=2, n_eval=32, latency_batch=2)
    for configs in (member_configs()[:3], member_configs()[1:2]):
        reads.clear()
        steps_done["n"] = 0
        results = evaluate_many(configs, "mqar", budget=budget, task_kwargs=TASK, device="cpu")
        assert all(r.state == "complete" and r.metrics["steps"] == 60 for r in results)
        between = [s for s in reads if s > 0 and s not in (30, 50, 60)]
        assert not between, f"reads of device values after steps {sorted(set(between))}"


@pytest.mark.slow  # about 40 s: compiles FlexAttention on the CPU
def test_populations_compile_flex_attention_once_per_shape_including_refills(flex_compiles: dict[str, int]) -> None:
    """FlexAttention's member path forced on the CPU (forward only: the evaluation passes), with a
    counting compiler backend: after the population's first rung no pass compiles again, though
    slots are refilled with new patterns, parameters and head counts (the mask table, BlockMasks and
    head groups keep their shapes)."""
    compiles = flex_compiles
    configs = member_configs()
    queue = [c.replace(seed=10 + i, window=3 + i, stride=4 + i, n_heads=HEADS[(i + 1) % 3]) for i, c in
             enumerate(configs)]  # fmt: skip
    after_first_rung: list[int] = []

    def reporter(member: int, step: int, accuracy: float) -> bool:
        after_first_rung.append(compiles["n"])
        return member % 2 == 0  # half of them leave at each rung: refills

    at_refill: list[int] = []

    def refill() -> AttentionConfig | None:
        if not queue:
            return None
        at_refill.append(compiles["n"])
        return queue.pop(0)

    budget = Budget(steps=6, rungs=3, n_eval=16, latency_batch=2)
    results = evaluate_many(configs[:4], "mqar", budget=budget, task_kwargs=TASK, device="cpu", kernel="flex",
                            reporter=reporter, refill=refill)  # fmt: skip
    assert len(results) == 4 + len(configs) and not queue
    # one kernel per head group (2, 4, 8) and pass (the timed pass and the evaluation pass)
    assert 0 < after_first_rung[0] <= 2 * len(HEADS)
    # every refill (and every rung while slots were refilled) ran on the kernels compiled first; once
    # nothing is left to refill, the population may shrink (a new size, compiled once more)
    assert len(at_refill) == len(configs) and set(at_refill) == {after_first_rung[0]}, at_refill


def test_one_time_limit_covers_every_population_of_a_call() -> None:
    """A time limit is the call's, not each population's: a population of another shape that
    starts after it has passed trains one step and ends (a search's deadline stays a deadline)."""
    first = member_configs()[0]
    wide = AttentionConfig(d_model=16, n_heads=2, pattern="window", window=4, batch_size=8)
    budget = Budget(steps=100_000, rungs=2, n_eval=16, latency_batch=2, time_limit_s=1.0)
    a, b = evaluate_many([first, wide], "mqar", budget=budget, task_kwargs=TASK, device="cpu")
    assert "time limit" in str(a.reason) and 1 < a.metrics["steps"] < 100_000
    assert "time limit" in str(b.reason) and b.metrics["steps"] == 1


@pytest.mark.slow  # about 30 s: compiles FlexAttention on the CPU
@pytest.mark.parametrize("heads", [(2, 8), None], ids=["range-known", "range-unknown"])
def test_refills_outside_the_first_head_counts_compile_nothing_when_the_range_is_known(
    flex_compiles: dict[str, int], heads: tuple[int, int] | None
) -> None:
    """A population whose first members all have 4 heads, refilled with a 2- and an 8-head member:
    told the space's head range (``heads=(2, 8)``, what a search passes), its head groups start
    that wide and the refills' first rungs compile nothing; without the range the layout grows to
    8 heads and that pass compiles again (which is why the search passes the range)."""
    compiles = flex_compiles
    first = [c.replace(n_heads=4) for c in member_configs()[:3]]
    queue = [first[0].replace(n_heads=2, seed=20), first[1].replace(n_heads=8, seed=21)]
    rungs: dict[tuple[int, int], int] = {}

    def reporter(member: int, step: int, accuracy: float) -> bool:
        rungs[member, step] = compiles["n"]
        return member == 0

    evaluate_many(first, "mqar", budget=Budget(steps=4, rungs=2, n_eval=16, latency_batch=2), task_kwargs=TASK,
                  device="cpu", kernel="flex", reporter=reporter, refill=lambda: queue.pop(0) if queue else None,
                  heads=heads)  # fmt: skip
    assert not queue
    first_rung = rungs[0, 2]
    assert first_rung > 0
    # members 3 (2 heads) and 4 (8 heads) are the refills; their first rungs ran before any shrink
    if heads is not None:
        assert rungs[3, 2] == rungs[4, 2] == first_rung, rungs
    else:
        assert rungs[4, 2] > first_rung, rungs


def _tensors(obj: object) -> dict[str, torch.Tensor]:
    return {name: t for name, t in vars(obj).items() if isinstance(t, torch.Tensor)}


@pytest.mark.slow  # (15-31 s: the default suite stays under 10 minutes on 2 cores)
def test_a_refill_copies_into_the_plan_so_no_tensor_moves(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a CUDA graph or compiled kernel captured stays valid across refills: the grouped layout's
    tables (masks, group membership, rotary, DropKey rates) and every group's BlockMask tensors keep
    their storage, the plan objects stay cached, and the refilled member computes exactly what its
    configuration alone computes (so the in-place update wrote the right rows)."""
    from attn_search.engine.member_layout import _BLOCK_MASK_TENSORS, MemberPlan

    monkeypatch.setattr(trainer_module, "SYNC_EVERY", 50)
    configs = [c.replace(attn_dropout=0.1 * (i % 2)) for i, c in enumerate(member_configs()[:4])]
    task = make_task("mqar", **TASK)
    model = build_model(configs, task, heads=(2, 8), kernel="flex", member_layout="grouped")
    x, y = task.data("train", 4)
    xs = x.unsqueeze(0).expand(len(configs), -1, -1)
    member_losses(model(xs), y.unsqueeze(0).expand_as(xs), 0.0).sum().backward()  # the training plan
    model.eval()
    with torch.no_grad():
        model(xs)  # the evaluation plan, FlexAttention's BlockMask
    attn = model.blocks[0].attn
    plans = dict(attn._plans)
    assert len(plans) == 2 and all(isinstance(p, MemberPlan) for p in plans.values())

    def pointers() -> dict[str, int]:
        out = {}
        for key, plan in plans.items():
            out |= {f"{key}.{n}": t.data_ptr() for n, t in _tensors(plan).items()}
            for g, bm in enumerate(plan.block_masks or []):
                out |= {f"{key}.bm{g}.{n}": getattr(bm, n).data_ptr() for n in _BLOCK_MASK_TENSORS
                        if getattr(bm, n) is not None}  # fmt: skip
        return out

    before = pointers()
    assert any(".bm2." in k for k in before) and any("attn_p" in k for k in before)
    new = configs[1].replace(pattern="bigbird", n_heads=8, seed=33, attn_dropout=0.05)  # other heads, pattern
    model.set_member(1, new)
    assert attn._plans == plans, "a refill inside the layout rebuilds no plan"
    assert pointers() == before
    with torch.no_grad():
        out = model(xs)[1]
        alone = build_model(new, task).eval()(x)
    assert torch.allclose(out, alone, atol=2e-6), (out - alone).abs().max()


def test_a_training_step_rebinds_no_tensor() -> None:
    """A step updates the population's and the optimiser's state in place: the same tensor objects
    (and storage) before and after, which capturing the step as a CUDA graph requires."""
    configs = member_configs()[:3]
    task = make_task("mqar", **TASK)
    pop = trainer_module.Population(list(enumerate(configs)), task, Budget(steps=5, rungs=1, n_eval=8), torch.device("cpu"),
                                     "auto", heads=(2, 8), member_layout="grouped")  # fmt: skip
    pop.train_step()  # the first step allocates the gradients and builds the plan
    owners = {"population": pop, "optimiser": pop.opt}
    before = {f"{o}.{n}": (t, t.data_ptr()) for o, obj in owners.items() for n, t in _tensors(obj).items()}
    steps = pop.step_of.clone()
    pop.train_step()
    after = {f"{o}.{n}": (t, t.data_ptr()) for o, obj in owners.items() for n, t in _tensors(obj).items()}
    assert after.keys() == before.keys()
    moved = [k for k in before if after[k][0] is not before[k][0] or after[k][1] != before[k][1]]
    assert not moved, moved
    assert torch.equal(pop.step_of, steps + 1)  # (the step did run and updated the state it kept)


def test_a_graphed_step_is_captured_again_whenever_a_tensor_it_read_moves(monkeypatch: pytest.MonkeyPatch) -> None:
    """A CUDA graph replays the kernels it captured on the storage they read; if a refill or a
    shrink moves a tensor and the step is not captured again, every later step silently trains on
    stale memory. On the CPU a stand-in graph checks, at every replay, that every tensor of the
    population's persistent state (its tables, the optimiser's buffers, the weights, each
    attention plan's tables) is where it was at capture, through a search with in-place refills, a
    refill its plan cannot hold (attention dropout where none was planned) and a shrink; and the
    results equal the eager step's."""
    captures: list[int] = []

    def pointers(pop: trainer_module.Population) -> dict[str, int]:
        out = {f"pop.{n}": t.data_ptr() for n, t in _tensors(pop).items()}
        out |= {f"opt.{n}": t.data_ptr() for n, t in _tensors(pop.opt).items()}
        out |= {f"param.{n}": p.data_ptr() for n, p in pop.model.named_parameters()}
        for i, block in enumerate(pop.model.blocks):
            for key, plan in block.attn._plans.items():
                if key[2] and key[3] and not isinstance(plan, list):  # the members' training plan
                    out |= {f"plan{i}.{n}": t.data_ptr() for n, t in _tensors(plan).items()}
        return out

    class StandIn(trainer_module._GraphedStep):
        def _warm(self) -> torch.Tensor:
            return self.pop.train_step()

        def _capture(self) -> None:
            pop, at_capture = self.pop, None

            class Graph:
                def replay(graph) -> None:
                    assert pointers(pop) == at_capture, "replayed on moved storage"
                    assert self.out is not None
                    self.out.copy_(pop.train_step())

            self.out = torch.zeros(pop.K)
            self.graph = Graph()
            at_capture = pointers(pop)  # (the warm-up steps built the step's plans)
            captures.append(pop.K)

    configs = [c.replace(attn_dropout=0.0) for c in member_configs()[:4]]
    queue = [configs[0].replace(seed=40, n_heads=8), configs[1].replace(seed=41, attn_dropout=0.1),
             configs[2].replace(seed=42, pattern="window")]  # fmt: skip
    budget = Budget(steps=24, rungs=3, n_eval=16, latency_batch=2)

    def run(graphed: bool) -> list[float]:
        todo = list(queue)
        monkeypatch.setattr(trainer_module, "_graphed", lambda *a: graphed)
        monkeypatch.setattr(trainer_module, "_GraphedStep", StandIn)
        results = evaluate_many(configs, "mqar", budget=budget, task_kwargs=TASK, device="cpu", member_layout="grouped",
                                reporter=lambda m, s, a: m < 2, refill=lambda: todo.pop(0) if todo else None)  # fmt: skip
        assert not todo and all(r.state in ("complete", "pruned") for r in results)
        return [r.metrics["final_loss"] for r in results]

    eager = run(False)
    assert not captures
    graphed = run(True)
    assert graphed == eager
    # captured at the start, after the dropout refill dropped the training plan, and after the shrink
    assert len(captures) >= 3 and captures[0] == 4 and min(captures) < 4, captures


def test_a_population_steps_by_events_and_commands_and_owns_its_random_state() -> None:
    """The protocol itself, driven by hand: ``advance`` returns the rungs of a check together and
    waits there; a ``stop`` before the next ``advance`` ends that member (pruned at its rung); its
    freed slot is announced and ``admit`` starts the next configuration in it. A caller drawing
    random numbers between two advances (as an RL agent does) changes nothing: members with
    dropout, whose masks come from the population's generator, train exactly as when nobody draws."""
    from attn_search.engine.trainer import Computed, Ended, Freed, Population, Rung

    configs = [c.replace(dropout=0.1) for c in member_configs()[:3]]
    task = make_task("mqar", **TASK)

    def drive(draw_between: bool) -> tuple[list[tuple[str, int, int]], dict[int, object]]:
        pop = Population([(0, configs[0]), (1, configs[1])], task, BUDGET, torch.device("cpu"), "auto")
        said: list[tuple[str, int, int]] = []
        results: dict[int, object] = {}
        while not pop.done:
            events = pop.advance()
            if draw_between:
                torch.rand(1000)  # the caller's own draws
            for e in events:
                if isinstance(e, Computed):
                    said.append(("computed", e.member, 0))
                    assert e.figures["flops"] > 0
                elif isinstance(e, Rung):
                    said.append(("rung", e.member, e.step))
                    if e.member == 1:
                        pop.stop(1, "told to stop")
                elif isinstance(e, Ended):
                    said.append(("ended", e.member, int(e.result.metrics["steps"])))
                    results[e.member] = e.result
                elif isinstance(e, Freed) and 2 not in results and all(s[1] != 2 for s in said):
                    said.append(("freed", e.slot, 0))
                    pop.admit(e.slot, 2, configs[2])
        return said, results

    said, results = drive(draw_between=False)
    assert said[:4] == [("computed", 0, 0), ("computed", 1, 0), ("rung", 0, 20), ("rung", 1, 20)]
    assert said[4:7] == [("ended", 1, 20), ("freed", 1, 0), ("computed", 2, 0)]  # ended, freed, admitted
    assert results[1].state == "pruned" and results[1].reason == "told to stop"  # type: ignore[attr-defined]
    assert [s for kind, m, s in said if kind == "rung" and m == 2] == [20, 40, 60]  # its own steps
    assert results[0].state == results[2].state == "complete"  # type: ignore[attr-defined]
    again, results_again = drive(draw_between=True)
    assert again == said
    for member in (0, 1, 2):
        assert results_again[member].curve == results[member].curve  # type: ignore[attr-defined]
