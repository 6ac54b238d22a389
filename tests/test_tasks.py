from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from attn_search import TASKS, Task, make_task
from attn_search.engine.tasks import IGNORE, ListOps


@pytest.mark.parametrize("name", list(TASKS))
def test_shapes_ranges_and_seeded(name: str) -> None:
    task = make_task(name, seq_len=128, seed=3)
    assert isinstance(task, Task)
    x, y = task.data("train", 64)
    assert x.shape == y.shape == (64, 128) and x.dtype == y.dtype == torch.long
    assert int(x.min()) >= 0 and int(x.max()) < task.vocab_size
    scored = y[y != IGNORE]
    assert len(scored) > 0 and int(scored.min()) >= 0 and int(scored.max()) < task.n_classes
    x2, y2 = make_task(name, seq_len=128, seed=3).data("train", 64)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    x3, _ = make_task(name, seq_len=128, seed=4).data("train", 64)
    assert not torch.equal(x, x3)


@pytest.mark.parametrize("name", list(TASKS))
def test_train_and_eval_are_disjoint(name: str) -> None:
    # A tiny space makes collisions likely, so disjointness is enforced, not lucky.
    kwargs = {
        "mqar": {"seq_len": 8, "n_pairs": 2, "n_keys": 4, "n_values": 8},
        "listops": {"seq_len": 8, "max_depth": 2, "max_args": 4, "min_len": 1},
        "selective_copy": {"seq_len": 12, "n_tokens": 2, "n_symbols": 20},
        "ngram": {"seq_len": 5, "order": 2, "vocab": 5},
        "delay": {"seq_len": 5, "lag": 2, "vocab": 5},
        "prefix_key": {"seq_len": 5, "n_keys": 4, "n_symbols": 5},
        "keyed_delay": {"seq_len": 5, "lag": 2, "n_keys": 4, "n_symbols": 5},
        "majority": {"seq_len": 12, "spread": 0.5, "min_pos": 2},
        "prefix_majority": {"seq_len": 12, "prefix": 3, "spread": 0.5},
        "segment_header": {"seq_len": 9, "n_headers": 3, "n_body": 3, "min_seg": 3, "max_seg": 4},
        "grid": {"seq_len": 7, "width": 2, "vocab": 3},
        "local_count": {"seq_len": 16, "span": 3},
        "prompt_lookup": {"seq_len": 12, "n_pairs": 2, "n_keys": 3, "n_values": 3},
        "variable_lag": {"seq_len": 7, "lags": (1, 2), "n_symbols": 2},
        "column_majority": {"seq_len": 14, "width": 3, "rows": 3},
        "novelty": {"seq_len": 6, "vocab": 5, "min_pos": 1},
        "lag_match": {"seq_len": 14, "lag": 3},
        "repeat": {"seq_len": 12, "vocab": 3, "min_period": 2, "max_period": 8},
        "local_novelty": {"seq_len": 7, "vocab": 4, "span": 2},
        "halve": {"seq_len": 9, "vocab": 3},
        "interleave": {"seq_len": 7, "vocab": 3, "order": 2},
        "block_rank": {"seq_len": 6, "vocab": 4, "block": 3},
        "gap": {"seq_len": 7, "vocab": 4},
        "token_count": {"seq_len": 7, "vocab": 4},
        "stride_count": {"seq_len": 14, "step": 2, "taps": 3},
        "first_match": {"seq_len": 7, "vocab": 4},
    }
    task = make_task(name, seed=0, **kwargs[name])
    x_eval, _ = task.data("eval", 4096)
    x_train, _ = task.data("train", 2000)
    eval_rows = {tuple(r) for r in x_eval.tolist()}
    train_rows = [tuple(r) for r in x_train.tolist()]
    assert not any(r in eval_rows for r in train_rows)
    # the check is not vacuous: a fresh draw from the generator collides with eval often
    fresh, _ = task.generate(np.random.default_rng(99), 2000)
    assert sum(tuple(r) in eval_rows for r in fresh.tolist()) > 20


def test_exhausted_task_space_is_a_clear_error() -> None:
    task = make_task("selective_copy", seq_len=3, n_tokens=1, n_symbols=2)  # only 4 distinct sequences
    with pytest.raises(ValueError, match="too few distinct sequences"):
        task.data("train", 10)


def test_mqar_answers_are_the_values_bound_earlier() -> None:
    task = make_task("mqar", seq_len=128, n_pairs=10)
    x, y = task.data("eval", 50)
    for row, target in zip(x.tolist(), y.tolist(), strict=True):
        queries = [i for i, t in enumerate(target) if t != IGNORE]
        assert len(queries) == 10
        for i in queries:
            first = row.index(row[i])
            assert first < i - 1, "the key occurs before its query"
            assert row[first + 1] - 1 - task.n_keys == target[i]


@pytest.mark.parametrize("distance", ["log_uniform", "uniform"])
def test_mqar_distances_span_the_sequence(distance: str) -> None:
    task = make_task("mqar", seq_len=256, distance=distance)
    x, y = task.data("eval", 200)
    dists = []
    for row, target in zip(x.tolist(), y.tolist(), strict=True):
        dists += [i - row.index(row[i]) for i, t in enumerate(target) if t != IGNORE]
    d = np.array(dists)
    assert d.min() >= 2 and d.max() <= 255
    if distance == "uniform":  # each quarter of the range holds a fair share
        shares = np.histogram(d, bins=4, range=(2, 256))[0] / len(d)
    else:  # each octave [2,4), [4,8), ... holds a fair share
        shares = np.histogram(np.log2(d), bins=7, range=(1, 8))[0] / len(d)
    assert (shares > 0.5 / len(shares)).all(), shares
    assert (d > 128).mean() > (0.3 if distance == "uniform" else 0.08), "long-range queries must occur"


def _reference_listops(tokens: list[int]) -> int:
    """Independent stack evaluator over the token stream."""
    ops = {11: min, 12: max, 13: lambda a: int(np.median(a)), 14: lambda a: sum(a) % 10}
    stack: list[list] = []
    for t in tokens:
        if t == 0:
            continue
        if 11 <= t <= 14:
            stack.append([t])
        elif t == 15:
            node = stack.pop()
            value = ops[node[0]](node[1:])
            if not stack:
                return value
            stack[-1].append(value)
        else:
            if not stack:
                return t - 1
            stack[-1].append(t - 1)
    raise AssertionError("unbalanced expression")


def test_listops_labels_match_an_independent_evaluator() -> None:
    task = make_task("listops", seq_len=128, seed=5)
    x, y = task.data("eval", 300)
    for row, target in zip(x.tolist(), y.tolist(), strict=True):
        assert target[-1] == _reference_listops(row)
        assert all(t == IGNORE for t in target[:-1])
    labels = y[:, -1]
    assert len(labels.unique()) == 10, "all ten classes occur"


def test_listops_depth_and_length_parameters() -> None:
    shallow = ListOps(seq_len=64, max_depth=3, max_args=3)
    x, _ = shallow.data("eval", 100)
    opens = ((x >= 11) & (x <= 14)).sum(dim=1)
    assert int(opens.max()) <= 1 + 3  # the root plus at most max_args operators at depth 2
    with pytest.raises(ValueError, match="rarely or never makes expressions"):
        ListOps(seq_len=64, max_depth=2, max_args=3, min_len=8).data("eval", 5)
    lengths = (x != 0).sum(dim=1)
    assert int(lengths.max()) <= 64 and int(lengths.min()) >= shallow.min_len


def test_selective_copy_targets_are_the_data_in_order() -> None:
    task = make_task("selective_copy", seq_len=40, n_tokens=5)
    x, y = task.data("eval", 30)
    for row, target in zip(x.tolist(), y.tolist(), strict=True):
        data = [t - 2 for t in row[:-5] if t >= 2]
        assert data == target[-5:]
        assert row[-5:] == [1] * 5


def _ngram_rule(x: torch.Tensor, y: torch.Tensor, order: int) -> dict[tuple[int, ...], int]:
    seen: dict[tuple[int, ...], int] = {}
    for row, target in zip(x.tolist(), y.tolist(), strict=True):
        assert target[: order - 1] == [IGNORE] * (order - 1)
        for t in range(order - 1, len(row)):
            assert seen.setdefault(tuple(row[t - order + 1 : t + 1]), target[t]) == target[t]
    return seen


def test_ngram_labels_are_one_function_of_the_last_tokens() -> None:
    rule = _ngram_rule(*make_task("ngram", seq_len=64, order=3, vocab=4).data("eval", 200), order=3)
    assert len(rule) == 4**3 and len(set(rule.values())) > 1  # every context seen, not a constant rule
    other = _ngram_rule(*make_task("ngram", seq_len=64, order=3, vocab=4, seed=9).data("eval", 200), order=3)
    assert other == rule, "another data seed draws other sequences under the same rule"
    changed = _ngram_rule(*make_task("ngram", seq_len=64, order=3, vocab=4, table_seed=1).data("eval", 200), order=3)
    assert changed != rule


def test_grid_labels_are_one_function_of_the_cells_above() -> None:
    x, y = make_task("grid", seq_len=60, width=5, vocab=4).data("eval", 200)
    assert (y[:, :10] == IGNORE).all()
    rule: dict[tuple[int, int], int] = {}
    for row, target in zip(x.tolist(), y.tolist(), strict=True):
        for t in range(10, 60):
            assert rule.setdefault((row[t - 5], row[t - 10]), target[t]) == target[t]
    assert len(rule) == 16 and len(set(rule.values())) > 1
    x2, y2 = make_task("grid", seq_len=60, width=5, vocab=4, table_seed=3).data("eval", 200)
    assert any(
        rule[(a[t - 5], a[t - 10])] != b[t]
        for a, b in zip(x2.tolist(), y2.tolist(), strict=True)
        for t in range(10, 60)
    )


def test_local_count_labels_count_the_ones_of_the_last_span() -> None:
    x, y = make_task("local_count", seq_len=30, span=6).data("eval", 30)
    for row, target in zip(x.tolist(), y.tolist(), strict=True):
        assert target[:5] == [IGNORE] * 5
        assert target[5:] == [sum(row[t - 5 : t + 1]) for t in range(5, 30)]
    assert make_task("local_count", span=6).n_classes == 7


def test_prompt_lookup_labels_are_the_values_the_prompt_binds() -> None:
    task = make_task("prompt_lookup", seq_len=30, n_pairs=3, n_keys=8, n_values=5)
    assert (task.vocab_size, task.n_classes) == (13, 5)
    x, y = task.data("eval", 40)
    for row, target in zip(x.tolist(), y.tolist(), strict=True):
        keys, values = row[0:6:2], [v - 8 for v in row[1:6:2]]
        assert len(set(keys)) == 3 and all(0 <= k < 8 for k in keys) and all(0 <= v < 5 for v in values)
        assert target[:6] == [IGNORE] * 6
        assert target[6:] == [values[keys.index(k)] for k in row[6:]]


def test_variable_lag_labels_are_the_symbol_each_token_points_back_to() -> None:
    task = make_task("variable_lag", seq_len=40, lags=[1, 3, 9], n_symbols=4)  # a list, as --task-param gives
    assert task.lags == (1, 3, 9) and task in {task}  # hashable: data is cached by task
    assert (task.vocab_size, task.n_classes) == (12, 4)
    x, y = task.data("eval", 30)
    for row, target in zip(x.tolist(), y.tolist(), strict=True):
        symbol, lag = [v // 3 for v in row], [(1, 3, 9)[v % 3] for v in row]
        assert target[:9] == [IGNORE] * 9
        assert target[9:] == [symbol[t - lag[t]] for t in range(9, 40)]
    assert {v % 3 for v in x.flatten().tolist()} == {0, 1, 2}


def test_column_majority_labels_are_the_majority_of_the_cells_above() -> None:
    x, y = make_task("column_majority", seq_len=40, width=4, rows=3).data("eval", 30)
    for row, target in zip(x.tolist(), y.tolist(), strict=True):
        assert target[:12] == [IGNORE] * 12
        assert target[12:] == [int(row[t - 4] + row[t - 8] + row[t - 12] >= 2) for t in range(12, 40)]


def test_novelty_labels_say_whether_the_token_occurred_earlier() -> None:
    x, y = make_task("novelty", seq_len=30, vocab=20, min_pos=3).data("eval", 30)
    for row, target in zip(x.tolist(), y.tolist(), strict=True):
        assert target[:3] == [IGNORE] * 3
        assert target[3:] == [int(row[t] in row[:t]) for t in range(3, 30)]
    assert 0.2 < float((y[:, 3:] == 1).float().mean()) < 0.8  # both answers common


def test_lag_match_labels_compare_each_bit_with_the_one_lag_back() -> None:
    x, y = make_task("lag_match", seq_len=30, lag=7).data("eval", 30)
    assert (y[:, :7] == IGNORE).all() and torch.equal(y[:, 7:], (x[:, 7:] == x[:, :-7]).long())
    assert 0.3 < float(y[:, 7:].float().mean()) < 0.7  # fair bits: both answers common


def test_repeat_labels_continue_each_sequence_s_own_period() -> None:
    for period in (3, 7):  # one period at a time: a pattern may repeat within its period by chance
        x, y = make_task("repeat", seq_len=30, vocab=5, min_period=period, max_period=period).data("eval", 20)
        for row, target in zip(x.tolist(), y.tolist(), strict=True):
            assert all(row[t] == row[t - period] for t in range(period, 30))
            assert target[:period] == [IGNORE] * period and target[-1] == IGNORE
            assert target[period:29] == row[period + 1 : 30]
    # the period differs between sequences: the first scored position is the period
    _, y = make_task("repeat", seq_len=40, vocab=5, min_period=3, max_period=9).data("eval", 50)
    assert len({int((row != IGNORE).nonzero()[0]) for row in y}) >= 5


def test_local_novelty_labels_say_whether_the_token_occurred_in_the_span_before() -> None:
    x, y = make_task("local_novelty", seq_len=30, vocab=16, span=8).data("eval", 30)
    for row, target in zip(x.tolist(), y.tolist(), strict=True):
        assert target[:8] == [IGNORE] * 8
        assert target[8:] == [int(row[t] in row[t - 8 : t]) for t in range(8, 30)]
    assert 0.25 < float((y[:, 8:] == 1).float().mean()) < 0.55  # about 40% repeat


def test_halve_labels_are_the_token_at_half_the_position() -> None:
    x, y = make_task("halve", seq_len=30, vocab=4).data("eval", 20)
    for row, target in zip(x.tolist(), y.tolist(), strict=True):
        assert target[:8] == [IGNORE] * 8 and target[8:] == [row[t // 2] for t in range(8, 30)]


def test_interleave_labels_are_a_rule_of_the_tokens_own_stream() -> None:
    task = make_task("interleave", seq_len=30, vocab=4, order=3)
    x, y = task.data("eval", 200)
    assert (y[:, :4] == IGNORE).all() and (y[:, 4:] != IGNORE).all()
    # one rule: the same (x[t], x[t-2], x[t-4]) always gives the same label, and the label depends on each of them
    seen: dict[tuple[int, ...], int] = {}
    for row, target in zip(x.tolist(), y.tolist(), strict=True):
        for t in range(4, 30):
            key = (row[t], row[t - 2], row[t - 4])
            assert seen.setdefault(key, target[t]) == target[t]
    assert len(seen) == 4**3
    for drop in range(3):  # no two of the three tokens decide it: each one matters
        rest: dict[tuple[int, ...], set[int]] = {}
        for key, label in seen.items():
            rest.setdefault(key[:drop] + key[drop + 1 :], set()).add(label)
        assert any(len(v) > 1 for v in rest.values())
    # a window's view, the three nearest tokens (x[t], x[t-1], x[t-2]), does not decide it: it misses x[t-4]
    window: dict[tuple[int, ...], set[int]] = {}
    for row, target in zip(x.tolist(), y.tolist(), strict=True):
        for t in range(4, 30):
            window.setdefault((row[t], row[t - 1], row[t - 2]), set()).add(target[t])
    assert sum(len(v) > 1 for v in window.values()) > len(window) // 2


def test_block_rank_labels_count_the_smaller_earlier_tokens_of_the_block() -> None:
    x, y = make_task("block_rank", seq_len=30, vocab=8, block=8).data("eval", 30)
    for row, target in zip(x.tolist(), y.tolist(), strict=True):
        for t in range(30):
            start = 8 * (t // 8)  # blocks 0-7, 8-15, ...: never the previous block's tokens
            assert target[t] == sum(v < row[t] for v in row[start:t])
    assert set(y[:, ::8].flatten().tolist()) == {0} and len(set(y.flatten().tolist())) >= 6


def test_gap_labels_are_the_octave_of_the_distance_to_the_token_s_last_occurrence() -> None:
    x, y = make_task("gap", seq_len=40, vocab=8).data("eval", 30)
    for row, target in zip(x.tolist(), y.tolist(), strict=True):
        for t in range(40):
            before = [s for s in range(t) if row[s] == row[t]]
            d = t - before[-1] if before else 0  # the latest occurrence, not the first
            assert target[t] == (0 if d == 0 else 1 + int(math.log2(min(d, 16))))
    assert set(y.flatten().tolist()) == set(range(6))


def test_token_count_labels_count_the_earlier_occurrences_up_to_three() -> None:
    x, y = make_task("token_count", seq_len=40, vocab=6).data("eval", 30)
    for row, target in zip(x.tolist(), y.tolist(), strict=True):
        assert target == [min(row[:t].count(row[t]), 3) for t in range(40)]
    assert set(y.flatten().tolist()) == {0, 1, 2, 3}


def test_stride_count_labels_count_the_ones_at_every_step_back() -> None:
    x, y = make_task("stride_count", seq_len=40, step=4, taps=5).data("eval", 30)
    for row, target in zip(x.tolist(), y.tolist(), strict=True):
        assert target[:16] == [IGNORE] * 16
        assert target[16:] == [sum(row[t - 4 * k] for k in range(5)) for t in range(16, 40)]
    assert len(set(y[:, 16:].flatten().tolist())) >= 5


def test_first_match_labels_compare_each_token_with_the_first() -> None:
    x, y = make_task("first_match", seq_len=30, vocab=4).data("eval", 30)
    for row, target in zip(x.tolist(), y.tolist(), strict=True):
        assert target == [IGNORE] + [int(v == row[0]) for v in row[1:]]
    assert set(y[:, 1:].flatten().tolist()) == {0, 1}


def test_delay_prefix_key_majority_and_segment_header_labels() -> None:
    x, y = make_task("delay", seq_len=40, lag=7).data("eval", 20)
    assert (y[:, :7] == IGNORE).all() and torch.equal(y[:, 7:], x[:, :-7])
    x, y = make_task("prefix_key", seq_len=30, n_keys=8, n_symbols=16).data("eval", 20)
    key = x[:, :1] - 16
    assert (key >= 0).all() and torch.equal(y[:, 1:], (x[:, 1:] + key) % 16)
    x, y = make_task("keyed_delay", seq_len=30, lag=5, n_keys=8, n_symbols=16).data("eval", 20)
    key = x[:, :1] - 16
    assert (key >= 0).all() and (x[:, 1:] < 16).all() and (y[:, :6] == IGNORE).all()
    assert torch.equal(y[:, 6:], (x[:, 1:25] + key) % 16)
    x, y = make_task("majority", seq_len=30, min_pos=4).data("eval", 20)
    for row, target in zip(x.tolist(), y.tolist(), strict=True):
        assert target[:4] == [IGNORE] * 4
        assert target[4:] == [int(2 * sum(row[: t + 1]) > t + 1) for t in range(4, 30)]
    x, y = make_task("prefix_majority", seq_len=40, prefix=7).data("eval", 50)
    assert (y[:, :7] == IGNORE).all() and torch.equal(
        y[:, 7:], (2 * x[:, :7].sum(1, keepdims=True) > 7).long().expand(-1, 33)
    )
    assert 0.3 < x[:, 7:].float().mean() < 0.7 and len(set(y[:, -1].tolist())) == 2
    task = make_task("segment_header", seq_len=80, n_headers=5, n_body=4)
    x, y = task.data("eval", 20)
    for row, target in zip(x.tolist(), y.tolist(), strict=True):
        header = None
        for t, (tok, lab) in enumerate(zip(row, target, strict=True)):
            if tok == 0:
                header = row[t + 1] - 1 if t + 1 < len(row) else None
                assert lab == IGNORE
            elif 1 <= tok <= 5:
                assert row[t - 1] == 0 and lab == IGNORE
            else:
                assert lab == (IGNORE if header is None else header)


def test_user_task_plugs_in_by_import_path() -> None:
    task = make_task("tests.custom_task:make", seq_len=16, seed=1, unused_kwarg=3)
    assert task.name == "parity" and task.seq_len == 16
    x, y = task.data("train", 8)
    assert torch.equal(y[:, -1], x.sum(dim=1) % 2)


@pytest.mark.parametrize(
    "spec,kwargs,match",
    [
        ("mnist", {}, "task 'mnist' is unknown: use one of mqar, listops, selective_copy, ngram"),
        ("mqar", {"length": 5}, "task 'mqar' has no parameter length"),
        ("tests.custom_task:missing", {}, "cannot be imported"),
        ("no_such_module:fn", {}, "cannot be imported"),
        ("tests.custom_task:not_a_task", {}, "lacks the Task protocol"),
        ("mqar", {"seq_len": 20, "n_pairs": 10}, r"seq_len=20 is too short for n_pairs=10: need seq_len >= 40"),
        ("prompt_lookup", {"seq_len": 8, "n_pairs": 4}, r"the prompt \(2 n_pairs\) must be shorter than seq_len"),
        ("prompt_lookup", {"n_pairs": 20, "n_keys": 16}, r"n_pairs=20 must lie in \[1, n_keys=16\]"),
        ("variable_lag", {"seq_len": 16, "lags": [2, 20]}, r"lags=\(2, 20\) must be non-empty and each lie in"),
        ("column_majority", {"seq_len": 16, "rows": 2}, r"need rows odd and rows \* width < seq_len"),
        ("novelty", {"vocab": 1}, r"vocab=1, min_pos=8: need vocab >= 2"),
        ("lag_match", {"seq_len": 16, "lag": 16}, r"lag=16 must lie in \[1, seq_len=16\)"),
        ("repeat", {"seq_len": 16, "max_period": 16}, r"need 1 <= min_period <= max_period < seq_len=16"),
        ("halve", {"seq_len": 8}, r"seq_len=8, vocab=4: need seq_len > 8 and vocab >= 2"),
        ("block_rank", {"seq_len": 16, "block": 1}, r"block=1, vocab=8: need 2 <= block <= seq_len=16"),
        ("interleave", {"seq_len": 6, "order": 4}, r"order=4, vocab=4: need 1 <= order, 2 \(order - 1\) < seq_len=6"),
        ("local_novelty", {"vocab": 1}, r"span=8, vocab=1: need 1 <= span < seq_len=256 and vocab >= 2"),
    ],
)
def test_bad_task_specs(spec: str, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_task(spec, **kwargs)
