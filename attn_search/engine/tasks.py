"""Generated tasks: seeded, no downloads, train and eval sets disjoint.

Every task is a per-position classification problem: inputs ``x`` ``(n, seq_len)`` of token ids
in ``[0, vocab_size)``, targets ``y`` ``(n, seq_len)`` in ``[0, n_classes)`` or ``IGNORE`` (-100)
where nothing is scored. Accuracy is the fraction of scored positions predicted right.

A user's own task plugs in as ``module:callable`` (``--task mypkg.tasks:make``): the callable is
called with the keyword arguments given (``seq_len``, ``seed``, ...) and must return an object
satisfying :class:`Task`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import inspect
from collections.abc import Iterator
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import torch

IGNORE = -100
Split = Literal["train", "eval"]


@runtime_checkable
class Task(Protocol):
    """What the trainer needs from a task.

    Attributes:
        name: short identifier, recorded with results.
        seq_len: length of every sequence.
        vocab_size: input token ids lie in ``[0, vocab_size)``.
        n_classes: targets lie in ``[0, n_classes)`` (or are ``-100`` where not scored).
    """

    @property
    def name(self) -> str: ...
    @property
    def seq_len(self) -> int: ...
    @property
    def vocab_size(self) -> int: ...
    @property
    def n_classes(self) -> int: ...

    def data(self, split: Split, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` examples of ``split`` as ``(x, y)`` long tensors of shape ``(n, seq_len)``.

        Deterministic for a given task seed; the ``train`` and ``eval`` splits must not share an
        example.
        """
        ...


def _row_hashes(x: np.ndarray) -> list[bytes]:
    return [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in x]


@dataclasses.dataclass(frozen=True)
class GeneratedTask:
    """Base class: subclasses implement :meth:`generate`; this class makes the splits.

    The eval split is a prefix of one pool of :data:`EVAL_POOL` examples drawn from a generator
    seeded with ``(seed, 1)``; the train split is drawn from ``(seed, 0)``, and train rows that
    occur anywhere in the eval pool are dropped and redrawn, so the splits are disjoint by
    construction, not by luck.
    """

    seq_len: int = 256
    seed: int = 0

    name = "generated"
    vocab_size = 0
    n_classes = 0

    def generate(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def data(self, split: Split, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        if split not in ("train", "eval"):
            raise ValueError(f"split={split!r} is unknown: use 'train' or 'eval'")
        x, y = self._cached(split, n)
        return torch.from_numpy(x), torch.from_numpy(y)

    def _cached(self, split: str, n: int) -> tuple[np.ndarray, np.ndarray]:
        key = (self, split, n)
        if key not in _DATA_CACHE:
            if len(_DATA_CACHE) > 16:
                _DATA_CACHE.clear()
            _DATA_CACHE[key] = self._make(split, n)
        return _DATA_CACHE[key]

    def _make(self, split: str, n: int) -> tuple[np.ndarray, np.ndarray]:
        if split == "eval":
            if n > EVAL_POOL:
                raise ValueError(f"at most {EVAL_POOL} eval examples can be drawn, {n} were asked for")
            x, y = self._cached("eval-pool", EVAL_POOL)
            return x[:n], y[:n]
        if split == "eval-pool":
            return self.generate(np.random.default_rng([self.seed, 1]), n)
        rng = np.random.default_rng([self.seed, 0])
        eval_x, _ = self._cached("eval-pool", EVAL_POOL)
        seen = set(_row_hashes(eval_x))
        xs, ys, have, draws = [], [], 0, 0
        while have < n:
            x, y = self.generate(rng, max(n - have, 64))
            draws += len(x)
            fresh = np.array([h not in seen for h in _row_hashes(x)], dtype=bool)
            xs.append(x[fresh][: n - have])
            ys.append(y[fresh][: n - have])
            have += len(xs[-1])
            if draws > 20 * n + 10_000 and have < n:
                raise ValueError(
                    f"task {self.name!r} {self} has too few distinct sequences to draw {n} training examples "
                    "disjoint from the eval set: raise seq_len or the task's vocabulary"
                )
        return np.concatenate(xs), np.concatenate(ys)


EVAL_POOL = 4096
"""Every eval set is a prefix of one pool of this many examples; train rows are checked against all of it."""
_DATA_CACHE: dict[tuple[Any, ...], tuple[np.ndarray, np.ndarray]] = {}


@dataclasses.dataclass(frozen=True)
class MQAR(GeneratedTask):
    """Multi-query associative recall (Arora et al. 2023, "Zoology", arXiv:2312.04927).

    Each sequence holds ``n_pairs`` key-value pairs (a key token followed by its value token) and,
    later, one query per pair: the key token again. At the query position the model must output
    the value. Everything else is a pad token. Unlike Zoology's layout (all pairs first), each
    key-to-query distance is drawn over the whole range ``[2, seq_len - 1]`` and the pair placed
    so it fits. With ``distance="log_uniform"`` (default) every scale of distance is equally
    common, so a window of ``w`` keys can answer about ``log(w/2) / log(L/2)`` of the queries:
    reach buys accuracy gradually (at L=256: window 32 ~0.6, window 128 ~0.87, dense 1.0 under
    the default budget). With ``distance="uniform"`` a window answers only ``~w/L`` of them.

    Tokens: 0 pad, ``1..n_keys`` keys, ``n_keys+1..n_keys+n_values`` values. Classes: the value
    index ``0..n_values-1``.
    """

    seq_len: int = 256
    seed: int = 0
    n_pairs: int = 32
    n_keys: int = 64
    n_values: int = 32
    distance: str = "log_uniform"

    name = "mqar"

    @property
    def vocab_size(self) -> int:  # type: ignore[override]
        return 1 + self.n_keys + self.n_values

    @property
    def n_classes(self) -> int:  # type: ignore[override]
        return self.n_values

    def __post_init__(self) -> None:
        if self.n_pairs > self.n_keys:
            raise ValueError(f"n_pairs={self.n_pairs} exceeds n_keys={self.n_keys}: keys must be unique per sequence")
        if self.distance not in ("uniform", "log_uniform"):
            raise ValueError(f"distance={self.distance!r} is unknown: use 'uniform' or 'log_uniform'")
        if 4 * self.n_pairs > self.seq_len:  # 3 slots a pair, plus room for random placement
            raise ValueError(
                f"seq_len={self.seq_len} is too short for n_pairs={self.n_pairs}: need seq_len >= "
                f"{4 * self.n_pairs} (4 x n_pairs); lower n_pairs or raise seq_len"
            )

    @staticmethod
    def _free_placement(rng: np.random.Generator, free: np.ndarray) -> tuple[int, int] | None:
        """A uniformly drawn (key position, distance) whose three slots are free."""
        L = len(free)
        starts = np.flatnonzero(free[:-2] & free[1:-1])  # key and value slots free
        later_free = np.cumsum(free[::-1])[::-1]  # later_free[i] = free slots at >= i
        starts = starts[later_free[np.minimum(starts + 2, L - 1)] > 0]
        if len(starts) == 0:
            return None
        p = int(rng.choice(starts))
        q = int(rng.choice(np.flatnonzero(free[p + 2 :]))) + p + 2
        return p, q - p

    def generate(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        L = self.seq_len
        x = np.zeros((n, L), dtype=np.int64)
        y = np.full((n, L), IGNORE, dtype=np.int64)
        used = np.zeros((n, L), dtype=bool)
        rows = np.arange(n)
        keys = np.argsort(rng.random((n, self.n_keys)), axis=1)[:, : self.n_pairs]  # distinct keys per row
        values = rng.integers(0, self.n_values, size=(n, self.n_pairs))
        for j in range(self.n_pairs):  # place pair j in every row at once, redrawing rows that collide
            pos = np.zeros(n, dtype=np.int64)
            dist = np.zeros(n, dtype=np.int64)
            todo = rows
            for _ in range(50):
                if self.distance == "uniform":  # query - key position, in [2, L - 1]
                    d = rng.integers(2, L, size=len(todo))
                else:
                    d = np.minimum(L - 1, np.exp(rng.uniform(np.log(2), np.log(L), size=len(todo))).astype(np.int64))
                p = (rng.random(len(todo)) * (L - d)).astype(np.int64)
                ok = ~(used[todo, p] | used[todo, p + 1] | used[todo, p + d])
                pos[todo[ok]], dist[todo[ok]] = p[ok], d[ok]
                todo = todo[~ok]
                if len(todo) == 0:
                    break
            for r in todo:  # crowded rows: draw among every placement still free
                placed = self._free_placement(rng, ~used[r])
                if placed is None:  # dead end: lay the row's first j pairs out again
                    used[r], x[r], y[r] = False, 0, IGNORE
                    for i, (p_i, d_i) in enumerate(self._row_layout(rng, j)):
                        used[r, [p_i, p_i + 1, p_i + d_i]] = True
                        self._write(x, y, r, p_i, d_i, keys[r, i], values[r, i])
                    placed = self._free_placement(rng, ~used[r])
                    assert placed is not None, "a fresh layout always has room (seq_len >= 4 n_pairs)"
                pos[r], dist[r] = placed
            for at in (pos, pos + 1, pos + dist):
                used[rows, at] = True
            self._write(x, y, rows, pos, dist, keys[:, j], values[:, j])
        return x, y

    def _write(self, x: np.ndarray, y: np.ndarray, r: Any, p: Any, d: Any, key: Any, value: Any) -> None:
        x[r, p] = 1 + key
        x[r, p + 1] = 1 + self.n_keys + value
        x[r, p + d] = 1 + key
        y[r, p + d] = value

    def _row_layout(self, rng: np.random.Generator, n_pairs: int) -> list[tuple[int, int]]:
        """(key position, distance) of ``n_pairs`` pairs in one row, retried until they all fit."""
        for _ in range(1000):
            free = np.ones(self.seq_len, dtype=bool)
            out = []
            for _ in range(n_pairs):
                placed = self._free_placement(rng, free)
                if placed is None:
                    break
                p, d = placed
                free[[p, p + 1, p + d]] = False
                out.append(placed)
            else:
                return out
        raise RuntimeError(f"could not lay out {n_pairs} MQAR pairs in {self.seq_len} positions")


@dataclasses.dataclass(frozen=True)
class ListOps(GeneratedTask):
    """ListOps with the Long Range Arena generator's semantics (Tay et al. 2020, arXiv:2011.04006;
    Nangia & Bowman 2018).

    Expressions nest the operators MIN, MAX, MED (median, rounded down) and SM (sum modulo 10) over
    digits 0-9, e.g. ``[MAX 4 3 [MIN 2 3 ] 1 0 ]`` = 4. As in LRA's generator, a node at depth
    below ``max_depth`` is an operator with probability ``1 - value_p`` with 2 to ``max_args``
    arguments, else a digit; expressions whose token count falls outside ``[min_len, seq_len]`` are
    redrawn. The expression is left-padded so it ends at the last position, where the 10-way label
    is scored.

    Tokens: 0 pad, 1-10 digits 0-9, 11 ``[MIN``, 12 ``[MAX``, 13 ``[MED``, 14 ``[SM``, 15 ``]``.
    """

    seq_len: int = 256
    seed: int = 0
    max_depth: int = 4
    max_args: int = 5
    value_p: float = 0.25
    min_len: int = 8

    name = "listops"
    vocab_size = 16
    n_classes = 10

    def _tree(self, rng: np.random.Generator, depth: int) -> list[int] | int:
        if depth < self.max_depth and rng.random() > self.value_p:
            op = int(rng.integers(11, 15))
            n_args = int(rng.integers(2, self.max_args + 1))
            return [op, *[self._tree(rng, depth + 1) for _ in range(n_args)]]  # type: ignore[list-item]
        return int(rng.integers(0, 10))

    @staticmethod
    def _eval(node: list[Any] | int) -> int:
        if isinstance(node, int):
            return node
        op, args = node[0], [ListOps._eval(a) for a in node[1:]]
        if op == 11:
            return min(args)
        if op == 12:
            return max(args)
        if op == 13:
            return int(np.median(args))
        return sum(args) % 10

    @staticmethod
    def _tokens(node: list[Any] | int) -> list[int]:
        if isinstance(node, int):
            return [1 + node]
        out = [node[0]]
        for a in node[1:]:
            out += ListOps._tokens(a)
        return [*out, 15]

    def generate(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        x = np.zeros((n, self.seq_len), dtype=np.int64)
        y = np.full((n, self.seq_len), IGNORE, dtype=np.int64)
        r = draws = 0
        while r < n:
            draws += 1
            if draws > 100 * n + 1000:
                raise ValueError(
                    f"listops with max_depth={self.max_depth}, max_args={self.max_args} rarely or never makes "
                    f"expressions of {self.min_len} to {self.seq_len} tokens: adjust min_len, seq_len or the depth"
                )
            tree = self._tree(rng, 1)
            toks = self._tokens(tree)
            if not self.min_len <= len(toks) <= self.seq_len:
                continue
            x[r, self.seq_len - len(toks) :] = toks
            y[r, -1] = self._eval(tree)
            r += 1
        return x, y


@dataclasses.dataclass(frozen=True)
class SelectiveCopy(GeneratedTask):
    """Selective copying (Gu & Dao 2023, "Mamba", arXiv:2312.00752).

    ``n_tokens`` data tokens are scattered at random positions of the first ``seq_len - n_tokens``
    positions (pad elsewhere); the last ``n_tokens`` positions hold a marker, and at the ``i``-th
    marker the model must output the ``i``-th data token in order.

    Tokens: 0 pad, 1 marker, ``2..2+n_symbols-1`` data. Classes: the data symbol.
    """

    seq_len: int = 256
    seed: int = 0
    n_tokens: int = 8
    n_symbols: int = 16

    name = "selective_copy"

    @property
    def vocab_size(self) -> int:  # type: ignore[override]
        return 2 + self.n_symbols

    @property
    def n_classes(self) -> int:  # type: ignore[override]
        return self.n_symbols

    def generate(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        L, k = self.seq_len, self.n_tokens
        x = np.zeros((n, L), dtype=np.int64)
        y = np.full((n, L), IGNORE, dtype=np.int64)
        for r in range(n):
            pos = np.sort(rng.choice(L - k, size=k, replace=False))
            sym = rng.integers(0, self.n_symbols, size=k)
            x[r, pos] = 2 + sym
            x[r, L - k :] = 1
            y[r, L - k :] = sym
        return x, y


class _TokensAreLabels:
    """For tasks whose labels are input tokens: ``vocab_size`` and ``n_classes`` are ``vocab``."""

    vocab: int

    @property
    def vocab_size(self) -> int:
        return self.vocab

    @property
    def n_classes(self) -> int:
        return self.vocab


def _rule_labels(x: np.ndarray, table: np.ndarray, order: int, vocab: int, step: int) -> np.ndarray:
    """Labels ``table[...]`` of the ``order`` tokens ``x[t], x[t - step], ...`` (the query's own most
    significant), ``IGNORE`` where they do not all exist: ``ngram``'s rule (``step=1``) and
    ``interleave``'s (``step=2``, the query's own stream)."""
    n, length = x.shape
    start = step * (order - 1)
    idx = np.zeros((n, length - start), dtype=np.int64)
    for k in range(order):  # the token k places back in the rule, most significant first
        idx = idx * vocab + x[:, start - step * k : length - step * k]
    y = np.full((n, length), IGNORE, dtype=np.int64)
    y[:, start:] = table[idx]
    return y


@dataclasses.dataclass(frozen=True)
class NGram(_TokensAreLabels, GeneratedTask):  # type: ignore[misc,override]
    """Local n-gram rule: the label at ``t`` is a fixed random function of the last ``order`` tokens.

    Language models spend most attention on the few tokens just before the query (Khandelwal et al.
    2018, "Sharp Nearby, Fuzzy Far Away", arXiv:1805.04623); this is that regime in its pure form.
    Tokens are uniform over ``vocab``; the table ``(vocab,) * order -> class`` is drawn from
    ``table_seed`` (fixed across splits and task seeds, so the rule is one thing to learn). Every
    position from ``order - 1`` on is scored. A window of ``order`` keys is enough; each extra
    offset is one more token to tell apart, which is what several heads buy; a dilated window
    skips the neighbours it needs.
    """

    seq_len: int = 256
    seed: int = 0
    order: int = 3
    vocab: int = 8
    table_seed: int = 0

    name = "ngram"

    def __post_init__(self) -> None:
        if self.order < 1 or self.order >= self.seq_len:
            raise ValueError(f"order={self.order} must lie in [1, seq_len={self.seq_len})")
        if self.vocab < 2 or self.vocab**self.order > 1 << 20:
            raise ValueError(
                f"vocab={self.vocab} with order={self.order} gives a table of {self.vocab**self.order} rows: keep it in [2, 2**20]"
            )

    def generate(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        table = np.random.default_rng([self.table_seed, 7]).integers(0, self.vocab, size=self.vocab**self.order)
        x = rng.integers(0, self.vocab, size=(n, self.seq_len))
        return x, _rule_labels(x, table, self.order, self.vocab, step=1)


@dataclasses.dataclass(frozen=True)
class Delay(_TokensAreLabels, GeneratedTask):  # type: ignore[misc,override]
    """Delayed copy: the label at ``t`` is the token ``lag`` positions back.

    A fixed, long offset, as periodic signals have (a season, a bar of music, a line of fixed width):
    what reaches it is a pattern with the right stride or dilation, or a wide enough window; how
    many keys a query sees matters less than which. Tokens uniform over ``vocab``; positions
    ``t >= lag`` are scored.
    """

    seq_len: int = 256
    seed: int = 0
    lag: int = 24
    vocab: int = 16

    name = "delay"

    def __post_init__(self) -> None:
        if not 1 <= self.lag < self.seq_len:
            raise ValueError(f"lag={self.lag} must lie in [1, seq_len={self.seq_len})")

    def generate(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        x = rng.integers(0, self.vocab, size=(n, self.seq_len))
        y = np.full((n, self.seq_len), IGNORE, dtype=np.int64)
        y[:, self.lag :] = x[:, : -self.lag]
        return x, y


@dataclasses.dataclass(frozen=True)
class PrefixKey(GeneratedTask):
    """An instruction at the start conditions every position: a Caesar shift read from token 0.

    Position 0 holds one of ``n_keys`` key tokens; every later position holds a symbol ``s`` and is
    labelled ``(s + key) mod n_symbols``. This is what global tokens are for (a task prefix, a
    system prompt, BERT's ``[CLS]``): every query must see the first position, however far, and
    nothing else but itself. Tokens: ``0..n_symbols-1`` symbols, then the keys.
    """

    seq_len: int = 256
    seed: int = 0
    n_keys: int = 8
    n_symbols: int = 16

    name = "prefix_key"

    @property
    def vocab_size(self) -> int:  # type: ignore[override]
        return self.n_symbols + self.n_keys

    @property
    def n_classes(self) -> int:  # type: ignore[override]
        return self.n_symbols

    def generate(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        x = rng.integers(0, self.n_symbols, size=(n, self.seq_len))
        key = rng.integers(0, self.n_keys, size=n)
        x[:, 0] = self.n_symbols + key
        y = np.full((n, self.seq_len), IGNORE, dtype=np.int64)
        y[:, 1:] = (x[:, 1:] + key[:, None]) % self.n_symbols
        return x, y


@dataclasses.dataclass(frozen=True)
class KeyedDelay(GeneratedTask):
    """Two far reads combined: the token ``lag`` positions back, shifted by a key at position 0.

    Position 0 holds one of ``n_keys`` key tokens; every later position holds a symbol, and
    position ``t > lag`` is labelled ``(x[t - lag] + key) mod n_symbols``. Neither read alone
    helps: the query needs the first position (what global tokens give) *and* a fixed offset
    (what a wide window, a stride or a dilation gives), as a decoder that follows an instruction
    while copying from a fixed lag does. It rewards patterns that combine reaches, and heads that
    split them. Tokens: ``0..n_symbols-1`` symbols, then the keys.
    """

    seq_len: int = 256
    seed: int = 0
    lag: int = 24
    n_keys: int = 8
    n_symbols: int = 16

    name = "keyed_delay"

    @property
    def vocab_size(self) -> int:  # type: ignore[override]
        return self.n_symbols + self.n_keys

    @property
    def n_classes(self) -> int:  # type: ignore[override]
        return self.n_symbols

    def __post_init__(self) -> None:
        if not 1 <= self.lag < self.seq_len - 1:
            raise ValueError(f"lag={self.lag} must lie in [1, seq_len - 1 = {self.seq_len - 1})")

    def generate(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        x = rng.integers(0, self.n_symbols, size=(n, self.seq_len))
        key = rng.integers(0, self.n_keys, size=n)
        x[:, 0] = self.n_symbols + key
        y = np.full((n, self.seq_len), IGNORE, dtype=np.int64)
        y[:, self.lag + 1 :] = (x[:, 1 : self.seq_len - self.lag] + key[:, None]) % self.n_symbols
        return x, y


@dataclasses.dataclass(frozen=True)
class Majority(GeneratedTask):
    """Running majority: the label at ``t`` says whether ones outnumber zeros in ``x[0..t]``.

    Aggregation over everything seen so far, which is attention as pooling (a uniform average over
    the prefix computes it exactly): a window sees only a local majority, right when the sequence
    leans clearly one way. Each sequence draws its own bias ``p ~ U(0.5 - spread, 0.5 + spread)``
    and its bits are Bernoulli(p). Positions from ``min_pos`` on are scored (ties count as zero).
    """

    seq_len: int = 256
    seed: int = 0
    spread: float = 0.2
    min_pos: int = 8

    name = "majority"
    vocab_size = 2
    n_classes = 2

    def __post_init__(self) -> None:
        if not 0.0 <= self.spread <= 0.5:
            raise ValueError(f"spread={self.spread} must lie in [0, 0.5]")
        if not 0 <= self.min_pos < self.seq_len:
            raise ValueError(f"min_pos={self.min_pos} must lie in [0, seq_len={self.seq_len})")

    def generate(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        p = rng.uniform(0.5 - self.spread, 0.5 + self.spread, size=(n, 1))
        x = (rng.random((n, self.seq_len)) < p).astype(np.int64)
        ones = np.cumsum(x, axis=1)
        y = (2 * ones > np.arange(1, self.seq_len + 1)).astype(np.int64)
        y[:, : self.min_pos] = IGNORE
        return x, y


@dataclasses.dataclass(frozen=True)
class PrefixMajority(GeneratedTask):
    """Aggregate a block of context far away: the label at every position from ``prefix`` on says
    whether ones outnumber zeros among the first ``prefix`` bits.

    A summary of a whole region (a document's opening paragraph, a prompt), read from everywhere
    after it: one global token does not hold it, a window does not reach it, but attending a whole
    block of leading positions does (BigBird's global blocks, or dense). Each sequence draws its
    bias ``p ~ U(0.5 - spread, 0.5 + spread)`` for its prefix; ``prefix`` is odd, so there are no
    ties; the bits after the prefix are fair coin flips, so they say nothing about it.
    """

    seq_len: int = 256
    seed: int = 0
    prefix: int = 15
    spread: float = 0.25

    name = "prefix_majority"
    vocab_size = 2
    n_classes = 2

    def __post_init__(self) -> None:
        if not (0 < self.prefix < self.seq_len and self.prefix % 2 == 1):
            raise ValueError(f"prefix={self.prefix} must be odd and lie in (0, seq_len={self.seq_len})")

    def generate(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        p = rng.uniform(0.5 - self.spread, 0.5 + self.spread, size=(n, 1))
        x = (rng.random((n, self.seq_len)) < 0.5).astype(np.int64)
        x[:, : self.prefix] = rng.random((n, self.prefix)) < p
        y = np.full((n, self.seq_len), IGNORE, dtype=np.int64)
        y[:, self.prefix :] = (2 * x[:, : self.prefix].sum(1, keepdims=True) > self.prefix).astype(np.int64)
        return x, y


@dataclasses.dataclass(frozen=True)
class SegmentHeader(GeneratedTask):
    """Documents packed into one sequence: every token is labelled with its document's header.

    The sequence is cut into segments of ``min_seg`` to ``max_seg`` tokens (as packed pretraining
    batches are); each starts with a separator and a header token, and every later token of the
    segment is labelled with that header. The reach a query needs is its distance to its own
    segment's start, which varies: nearer headers of other segments must be ignored by content
    (the separator), not by position. Tokens: 0 separator, ``1..n_headers`` headers, then
    ``n_body`` body tokens. Classes: the header index.
    """

    seq_len: int = 256
    seed: int = 0
    n_headers: int = 16
    n_body: int = 16
    min_seg: int = 4
    max_seg: int = 40

    name = "segment_header"

    @property
    def vocab_size(self) -> int:  # type: ignore[override]
        return 1 + self.n_headers + self.n_body

    @property
    def n_classes(self) -> int:  # type: ignore[override]
        return self.n_headers

    def __post_init__(self) -> None:
        if not 3 <= self.min_seg <= self.max_seg:
            raise ValueError(f"min_seg={self.min_seg}, max_seg={self.max_seg}: need 3 <= min_seg <= max_seg")

    def generate(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        L = self.seq_len
        x = 1 + self.n_headers + rng.integers(0, self.n_body, size=(n, L))
        y = np.full((n, L), IGNORE, dtype=np.int64)
        for r in range(n):
            # The first segment began before position 0; its header is unseen, so it is not scored.
            start = int(rng.integers(0, self.max_seg))
            while start < L:
                length = int(rng.integers(self.min_seg, self.max_seg + 1))
                header = int(rng.integers(0, self.n_headers))
                x[r, start] = 0
                if start + 1 < L:
                    x[r, start + 1] = 1 + header
                y[r, start + 2 : start + length] = header
                start += length
        return x, y


@dataclasses.dataclass(frozen=True)
class Grid(_TokensAreLabels, GeneratedTask):  # type: ignore[misc,override]
    """A column of a raster-scanned grid: the label at ``t`` is a fixed random function of the cells
    one and two rows above it (``t - width`` and ``t - 2 width``).

    Images, tables and spreadsheets are flattened row by row, so a neighbour in the second dimension
    sits ``width`` positions back: what the Sparse Transformer's strided attention was designed for
    (Child et al. 2019, arXiv:1904.10509). (The left neighbour is not used: the model's token shift
    already sees it.) A pattern must reach both offsets at once: a band wider than ``2 width``, a
    stride or dilation that divides ``width`` with enough reach; a short window misses both, and a
    dilation that does not divide ``width`` misses them at any reach. The rule ``(vocab, vocab) ->
    class`` is drawn from ``table_seed`` (fixed across splits and data seeds); positions from
    ``2 width`` on are scored.
    """

    seq_len: int = 256
    seed: int = 0
    width: int = 10
    vocab: int = 8
    table_seed: int = 0

    name = "grid"

    def __post_init__(self) -> None:
        if not 2 <= 2 * self.width < self.seq_len:
            raise ValueError(f"width={self.width} must lie in [1, seq_len/2={self.seq_len / 2})")
        if self.vocab < 2:
            raise ValueError(f"vocab={self.vocab} must be >= 2")

    def generate(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        table = np.random.default_rng([self.table_seed, 11]).integers(0, self.vocab, size=self.vocab**2)
        x = rng.integers(0, self.vocab, size=(n, self.seq_len))
        y = np.full((n, self.seq_len), IGNORE, dtype=np.int64)
        w = self.width
        y[:, 2 * w :] = table[x[:, w:-w] * self.vocab + x[:, : -2 * w]]
        return x, y


@dataclasses.dataclass(frozen=True)
class LocalCount(GeneratedTask):
    """Count over a fixed recent span: the label at ``t`` is how many ones ``x[t - span + 1 .. t]``
    holds (``span + 1`` classes).

    Local aggregation with a hard edge (a rate over the last N events, a moving sum): attention
    computes it as a uniform average over exactly the last ``span`` keys, so a causal window of
    ``span`` is the exact inductive bias; a longer reach mixes in bits that must be learnt away by
    position. A dilation of 2 counts every other position, which with the model's token shift (each
    position also carries its predecessor) is every bit: dilated(8, 2) covers a span of 16 at the
    cost of a window of 8. Bits are Bernoulli(1/2); positions from ``span - 1`` on are scored.
    """

    seq_len: int = 256
    seed: int = 0
    span: int = 16

    name = "local_count"
    vocab_size = 2

    @property
    def n_classes(self) -> int:  # type: ignore[override]
        return self.span + 1

    def __post_init__(self) -> None:
        if not 1 <= self.span <= self.seq_len:
            raise ValueError(f"span={self.span} must lie in [1, seq_len={self.seq_len}]")

    def generate(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        x = (rng.random((n, self.seq_len)) < 0.5).astype(np.int64)
        ones = np.concatenate([np.zeros((n, 1), dtype=np.int64), np.cumsum(x, axis=1)], axis=1)
        y = np.full((n, self.seq_len), IGNORE, dtype=np.int64)
        s = self.span
        y[:, s - 1 :] = ones[:, s:] - ones[:, : self.seq_len - s + 1]
        return x, y


@dataclasses.dataclass(frozen=True)
class PromptLookup(GeneratedTask):
    """A dictionary in the prompt: the first ``2 n_pairs`` positions hold key-value pairs, and every
    later position holds a key and is labelled with that key's value.

    Retrieval confined to the start of the sequence (a tool's schema, a glossary in a system
    prompt): the reach a query needs is its distance to the prompt, not to a nearby pair as in
    MQAR, so a window misses every query past it, one or two global tokens hold one pair, and a
    global block as long as the prompt (BigBird) holds all of them at the cost of a short window.
    The value token follows its key, so the model's token shift carries the key into the value's
    position (what a query matches). Keys are distinct within a sequence; later positions draw keys
    uniformly. Tokens: ``0..n_keys-1`` keys, then ``n_values`` values; classes: the values.
    """

    seq_len: int = 256
    seed: int = 0
    n_pairs: int = 4
    n_keys: int = 16
    n_values: int = 16

    name = "prompt_lookup"

    @property
    def vocab_size(self) -> int:  # type: ignore[override]
        return self.n_keys + self.n_values

    @property
    def n_classes(self) -> int:  # type: ignore[override]
        return self.n_values

    def __post_init__(self) -> None:
        if not 1 <= self.n_pairs <= self.n_keys:
            raise ValueError(f"n_pairs={self.n_pairs} must lie in [1, n_keys={self.n_keys}]")
        if not 2 * self.n_pairs < self.seq_len:
            raise ValueError(f"n_pairs={self.n_pairs}: the prompt (2 n_pairs) must be shorter than seq_len")

    def generate(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        P = self.n_pairs
        keys = np.argsort(rng.random((n, self.n_keys)), axis=1)[:, :P]  # distinct keys per sequence
        values = rng.integers(0, self.n_values, size=(n, P))
        x = np.empty((n, self.seq_len), dtype=np.int64)
        x[:, 0 : 2 * P : 2] = keys
        x[:, 1 : 2 * P : 2] = self.n_keys + values
        pick = rng.integers(0, P, size=(n, self.seq_len - 2 * P))
        x[:, 2 * P :] = np.take_along_axis(keys, pick, axis=1)
        y = np.full((n, self.seq_len), IGNORE, dtype=np.int64)
        y[:, 2 * P :] = np.take_along_axis(values, pick, axis=1)
        return x, y


@dataclasses.dataclass(frozen=True)
class VariableLag(GeneratedTask):
    """Each query names its own offset: a position holds a symbol and one of ``lags``, and is
    labelled with the symbol that many positions back.

    Relative references that vary by query ("as two lines above", a diff's hunk offset, a pointer
    in a log): no single fixed reach serves, but offsets at several scales do. A dilation whose
    reach covers the largest lag and divides every one (dilated(32, 2) for the default lags) reaches
    all of them at a fraction of a window's cost; a short window or a dilation that skips a lag
    loses that lag's share; heads can split the scales. Token ``s * len(lags) + i`` is symbol ``s``
    with lag ``lags[i]``; classes: the symbols; positions from ``max(lags)`` on are scored.
    """

    seq_len: int = 256
    seed: int = 0
    lags: tuple[int, ...] = (2, 4, 8, 16, 32)
    n_symbols: int = 8

    name = "variable_lag"

    @property
    def vocab_size(self) -> int:  # type: ignore[override]
        return self.n_symbols * len(self.lags)

    @property
    def n_classes(self) -> int:  # type: ignore[override]
        return self.n_symbols

    def __post_init__(self) -> None:
        object.__setattr__(self, "lags", tuple(int(v) for v in self.lags))  # hashable (a cache key) from a list
        if not self.lags or not all(1 <= lag < self.seq_len for lag in self.lags):
            raise ValueError(f"lags={self.lags} must be non-empty and each lie in [1, seq_len={self.seq_len})")

    def generate(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        k = len(self.lags)
        sym = rng.integers(0, self.n_symbols, size=(n, self.seq_len))
        which = rng.integers(0, k, size=(n, self.seq_len))
        x = sym * k + which
        lag = np.asarray(self.lags)[which]
        t = np.arange(self.seq_len)[None, :]
        src = np.clip(t - lag, 0, None)
        y = np.take_along_axis(sym, src, axis=1)
        y[:, : max(self.lags)] = IGNORE
        return x, y


@dataclasses.dataclass(frozen=True)
class ColumnMajority(GeneratedTask):
    """A column summary of a raster-scanned grid of bits: the label at ``t`` says whether ones hold
    the majority of the ``rows`` cells above it (``t - width``, ``t - 2 width``, ...).

    Aggregation along the second dimension of flattened data (a column of a table or an image,
    one field across the records of a fixed-width log): what the Sparse Transformer's strided
    attention keeps, the keys a multiple of ``width`` back (Child et al. 2019). A window reaches
    only the nearest rows, a dilation that divides ``width`` reaches them with cells of other
    columns beside, which must be learnt away by position. ``rows`` is odd, so there are no ties;
    positions from ``rows * width`` on are scored.
    """

    seq_len: int = 256
    seed: int = 0
    width: int = 8
    rows: int = 5

    name = "column_majority"
    vocab_size = 2
    n_classes = 2

    def __post_init__(self) -> None:
        if self.width < 1 or self.rows < 1 or self.rows % 2 == 0 or self.rows * self.width >= self.seq_len:
            raise ValueError(f"width={self.width}, rows={self.rows}: need rows odd and rows * width < seq_len")

    def generate(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        x = (rng.random((n, self.seq_len)) < 0.5).astype(np.int64)
        start = self.rows * self.width
        above = np.zeros((n, self.seq_len - start), dtype=np.int64)
        for k in range(1, self.rows + 1):
            above += x[:, start - k * self.width : self.seq_len - k * self.width]
        y = np.full((n, self.seq_len), IGNORE, dtype=np.int64)
        y[:, start:] = 2 * above > self.rows
        return x, y


@dataclasses.dataclass(frozen=True)
class Novelty(GeneratedTask):
    """Has this token been seen before? The label at ``t`` says whether ``x[t]`` occurs anywhere in
    ``x[0..t-1]``.

    Membership over the whole prefix by content (deduplication, a copy detector, "have I read this
    name before"): a query must match its own token against every earlier key, however far, and
    needs no position at all; a window answers only for repeats within its reach. Tokens are uniform
    over ``vocab``, so at ``seq_len ~ vocab`` about half the positions are repeats; positions from
    ``min_pos`` on are scored.
    """

    seq_len: int = 256
    seed: int = 0
    vocab: int = 48
    min_pos: int = 8

    name = "novelty"
    n_classes = 2

    @property
    def vocab_size(self) -> int:  # type: ignore[override]
        return self.vocab

    def __post_init__(self) -> None:
        if self.vocab < 2 or not 0 <= self.min_pos < self.seq_len:
            raise ValueError(f"vocab={self.vocab}, min_pos={self.min_pos}: need vocab >= 2, 0 <= min_pos < seq_len")

    def generate(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        x = rng.integers(0, self.vocab, size=(n, self.seq_len))
        seen = np.zeros((n, self.vocab), dtype=bool)
        y = np.empty((n, self.seq_len), dtype=np.int64)
        rows = np.arange(n)
        for t in range(self.seq_len):
            y[:, t] = seen[rows, x[:, t]]
            seen[rows, x[:, t]] = True
        y[:, : self.min_pos] = IGNORE
        return x, y


@dataclasses.dataclass(frozen=True)
class LagMatch(GeneratedTask):
    """Does the bit ``lag`` positions back equal this one? The label at ``t`` is ``x[t] == x[t - lag]``.

    A comparison at one fixed, long offset (a change detector against the previous period, a
    checksum of a fixed-width record): like ``delay`` it needs the one offset, but the answer is
    a comparison, so a pattern that misses the offset is at chance, not merely worse. With the
    model's token shift a key at ``lag - 1`` carries the bit too, so for the default 22
    dilated(8, 3) reaches it and dilated(8, 4) does not. Bits are fair; positions from ``lag`` on
    are scored.
    """

    seq_len: int = 256
    seed: int = 0
    lag: int = 22

    name = "lag_match"
    vocab_size = 2
    n_classes = 2

    def __post_init__(self) -> None:
        if not 1 <= self.lag < self.seq_len:
            raise ValueError(f"lag={self.lag} must lie in [1, seq_len={self.seq_len})")

    def generate(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        x = (rng.random((n, self.seq_len)) < 0.5).astype(np.int64)
        y = np.full((n, self.seq_len), IGNORE, dtype=np.int64)
        y[:, self.lag :] = x[:, self.lag :] == x[:, : -self.lag]
        return x, y


@dataclasses.dataclass(frozen=True)
class Repeat(_TokensAreLabels, GeneratedTask):  # type: ignore[misc,override]
    """Continue a repeated pattern: each sequence tiles a random pattern whose period is drawn from
    ``[min_period, max_period]``, and the label at ``t`` is the next token, ``x[t + 1]``, once it
    repeats an earlier one (``t >= period``: before, the period cannot be known from the input).

    In-context copying, what induction heads do (Olsson et al. 2022, arXiv:2209.11895): the answer
    sits one period back, and the period differs between sequences, so a pattern must reach every
    offset up to ``max_period`` (found by content, not a fixed lag): a window as long as the longest
    period wins, a short window or a sparse stride knows only some periods. Tokens and classes:
    ``0..vocab-1``.
    """

    seq_len: int = 256
    seed: int = 0
    vocab: int = 8
    min_period: int = 3
    max_period: int = 24

    name = "repeat"

    def __post_init__(self) -> None:
        if not 1 <= self.min_period <= self.max_period < self.seq_len or self.vocab < 2:
            raise ValueError(f"min_period={self.min_period}, max_period={self.max_period}, vocab={self.vocab}: need "
                             f"1 <= min_period <= max_period < seq_len={self.seq_len} and vocab >= 2")  # fmt: skip

    def generate(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        L = self.seq_len
        period = rng.integers(self.min_period, self.max_period + 1, size=n)
        pattern = rng.integers(0, self.vocab, size=(n, self.max_period))
        t = np.arange(L)
        x = np.take_along_axis(pattern, t[None, :] % period[:, None], axis=1).astype(np.int64)
        y = np.full((n, L), IGNORE, dtype=np.int64)
        scored = (t[None, :] >= period[:, None]) & (t[None, :] < L - 1)
        nxt = np.concatenate([x[:, 1:], x[:, :1]], axis=1)
        y[scored] = nxt[scored]
        return x, y


@dataclasses.dataclass(frozen=True)
class LocalNovelty(GeneratedTask):
    """Is this token new to the recent span? The label at ``t`` says whether ``x[t]`` occurs among
    the ``span`` tokens before it.

    A comparison against every recent token at once (a repetition or stutter detector in a local
    context): unlike ``novelty`` (anywhere before), the span is short and fixed, so a window of the
    span at least holds it all and a dilated pattern that skips offsets misses repeats there. With
    the default 16 symbols and span 8 about 40% of positions repeat. Positions from ``span`` on
    are scored.
    """

    seq_len: int = 256
    seed: int = 0
    vocab: int = 16
    span: int = 8

    name = "local_novelty"
    n_classes = 2

    @property
    def vocab_size(self) -> int:  # type: ignore[override]
        return self.vocab

    def __post_init__(self) -> None:
        if not 1 <= self.span < self.seq_len or self.vocab < 2:
            raise ValueError(
                f"span={self.span}, vocab={self.vocab}: need 1 <= span < seq_len={self.seq_len} and vocab >= 2"
            )

    def generate(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        x = rng.integers(0, self.vocab, size=(n, self.seq_len)).astype(np.int64)
        seen = np.zeros(x.shape, dtype=bool)
        for k in range(1, self.span + 1):
            seen[:, k:] |= x[:, k:] == x[:, :-k]
        y = np.full(x.shape, IGNORE, dtype=np.int64)
        y[:, self.span :] = seen[:, self.span :]
        return x, y


@dataclasses.dataclass(frozen=True)
class Halve(_TokensAreLabels, GeneratedTask):  # type: ignore[misc,override]
    """Read at half the position: the label at ``t`` is ``x[t // 2]``.

    Addressing by position rather than by content or a fixed lag (a pointer into the sequence, a
    downsampled copy, the second half of an alignment): the offset a query needs, ``t - t // 2``,
    grows with its position, so a pattern reaches it only where its offsets cover that position's,
    and every offset up to half the length is needed somewhere. Tokens and classes: ``0..vocab-1``;
    positions from 8 on are scored.
    """

    seq_len: int = 256
    seed: int = 0
    vocab: int = 4

    name = "halve"

    def __post_init__(self) -> None:
        if self.seq_len <= 8 or self.vocab < 2:
            raise ValueError(f"seq_len={self.seq_len}, vocab={self.vocab}: need seq_len > 8 and vocab >= 2")

    def generate(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        x = rng.integers(0, self.vocab, size=(n, self.seq_len)).astype(np.int64)
        y = np.full(x.shape, IGNORE, dtype=np.int64)
        t = np.arange(8, self.seq_len)
        y[:, 8:] = x[:, t // 2]
        return x, y


@dataclasses.dataclass(frozen=True)
class Interleave(_TokensAreLabels, GeneratedTask):  # type: ignore[misc,override]
    """Two interleaved streams: the label at ``t`` is a fixed random function of the last ``order``
    tokens of ``t``'s own stream, ``x[t], x[t - 2], ..., x[t - 2 (order - 1)]``.

    Multiplexed sequences (two speakers' turns, stereo channels, a real and an imaginary part, a
    key and a value alternating): the neighbour a query needs is every second token, so a dilation
    of 2 holds exactly what matters, a window needs twice the reach and mixes in the other stream,
    and dilations of 3 or 4 miss the stream. The table ``(vocab,) * order -> class`` is drawn from
    ``table_seed`` (one rule across splits and task seeds). Positions from ``2 (order - 1)`` on are
    scored.
    """

    seq_len: int = 256
    seed: int = 0
    vocab: int = 4
    order: int = 4
    table_seed: int = 0

    name = "interleave"

    def __post_init__(self) -> None:
        if self.order < 1 or 2 * (self.order - 1) >= self.seq_len or self.vocab < 2 or self.vocab**self.order > 1 << 20:
            raise ValueError(
                f"order={self.order}, vocab={self.vocab}: need 1 <= order, 2 (order - 1) < seq_len={self.seq_len}, "
                "vocab >= 2 and vocab**order <= 2**20"
            )

    def generate(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        table = np.random.default_rng([self.table_seed, 11]).integers(0, self.vocab, size=self.vocab**self.order)
        x = rng.integers(0, self.vocab, size=(n, self.seq_len)).astype(np.int64)
        return x, _rule_labels(x, table, self.order, self.vocab, step=2)


@dataclasses.dataclass(frozen=True)
class BlockRank(GeneratedTask):
    """Rank within a fixed block: the sequence is cut into blocks of ``block`` tokens, and the label
    at ``t`` counts the earlier tokens of ``t``'s block that are smaller than ``x[t]``.

    Work confined to aligned chunks (rows of a table, frames, packed fixed-size records, a sort
    within each bucket): a query needs every earlier token of its own block and nothing outside it,
    so a block-local pattern aligned with the blocks (BigBird's blocks of the same size) holds
    exactly that, while a sliding window of the same size straddles two blocks and mixes in the
    previous one. Tokens uniform over ``vocab``; classes ``0..block-1``; every position is scored
    (a block's first token has label 0).
    """

    seq_len: int = 256
    seed: int = 0
    vocab: int = 8
    block: int = 8

    name = "block_rank"

    @property
    def vocab_size(self) -> int:  # type: ignore[override]
        return self.vocab

    @property
    def n_classes(self) -> int:  # type: ignore[override]
        return self.block

    def __post_init__(self) -> None:
        if not 2 <= self.block <= self.seq_len or self.vocab < 2:
            raise ValueError(
                f"block={self.block}, vocab={self.vocab}: need 2 <= block <= seq_len={self.seq_len} and vocab >= 2"
            )

    def generate(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        x = rng.integers(0, self.vocab, size=(n, self.seq_len)).astype(np.int64)
        y = np.zeros(x.shape, dtype=np.int64)
        for t in range(self.seq_len):
            start = t - t % self.block
            y[:, t] = (x[:, start:t] < x[:, t : t + 1]).sum(axis=1)
        return x, y


@dataclasses.dataclass(frozen=True)
class _EarlierOccurrences(GeneratedTask):
    """Base of the tasks that label each uniform token by its own earlier occurrences (``gap``,
    ``token_count``): subclasses give :meth:`label` of the matches."""

    seq_len: int = 256
    seed: int = 0
    vocab: int = 8

    @property
    def vocab_size(self) -> int:  # type: ignore[override]
        return self.vocab

    def __post_init__(self) -> None:
        if self.vocab < 2 or self.seq_len < 2:
            raise ValueError(f"vocab={self.vocab}, seq_len={self.seq_len}: need vocab >= 2 and seq_len >= 2")

    def label(self, x: np.ndarray, matches: Iterator[tuple[int, np.ndarray]]) -> np.ndarray:
        raise NotImplementedError

    def generate(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        x = rng.integers(0, self.vocab, size=(n, self.seq_len)).astype(np.int64)
        # (k, hit): hit[:, t] says x[t] == x[t - k], for k from seq_len - 1 down to 1 (the nearest last)
        matches = ((k, np.pad(x[:, k:] == x[:, :-k], ((0, 0), (k, 0)))) for k in range(self.seq_len - 1, 0, -1))
        return x, self.label(x, matches).astype(np.int64)


@dataclasses.dataclass(frozen=True)
class Gap(_EarlierOccurrences):
    """How far back was this token last seen? The label at ``t`` is the distance ``d`` to the
    previous occurrence of ``x[t]`` in octaves: 0 if none, 1 for ``d = 1``, 2 for 2-3, 3 for 4-7,
    4 for 8-15 and 5 for 16 or more.

    Recency by content (a cache's reuse distance, how long ago a speaker or a variable last
    appeared): a query must find its own symbol's latest occurrence and read where it is, so exact
    relative positions count where they are close and only coarsely where they are far. A short
    window sees the near octaves exactly, and a key it does not see says "8 or more"; a longer
    reach mixes in older occurrences of the same symbol. With the default 8 symbols at L=64 about 12%
    of positions have none before (fewer at longer lengths); every position is scored.
    """

    vocab: int = 8

    name = "gap"
    n_classes = 6

    def label(self, x: np.ndarray, matches: Iterator[tuple[int, np.ndarray]]) -> np.ndarray:
        d = np.zeros(x.shape, dtype=np.int64)
        for k, hit in matches:  # nearest last, so the latest occurrence's distance stays
            d[hit] = k
        return np.where(d == 0, 0, np.searchsorted(np.array([1, 2, 4, 8, 16]), d, side="right"))


@dataclasses.dataclass(frozen=True)
class TokenCount(_EarlierOccurrences):
    """How often has this token been seen? The label at ``t`` is how many times ``x[t]`` occurs in
    ``x[0..t-1]``, 3 meaning 3 or more.

    A count by content over the whole prefix (term frequency, how many times a user repeated a
    request): unlike ``novelty`` (seen at all) or ``local_novelty`` (within a recent span), the
    query must count matches anywhere before it, so every key may matter and an attention's
    averaging has to turn into a count. With the default 16 symbols at L=64 the four classes
    hold 25%, 23%, 19% and 33% of positions; every position is scored.
    """

    vocab: int = 16

    name = "token_count"
    n_classes = 4

    def label(self, x: np.ndarray, matches: Iterator[tuple[int, np.ndarray]]) -> np.ndarray:
        return np.minimum(sum(hit.astype(np.int64) for _, hit in matches), 3)


@dataclasses.dataclass(frozen=True)
class StrideCount(GeneratedTask):
    """A count at a stride: the label at ``t`` is how many ones the ``taps`` bits ``x[t],
    x[t - step], ..., x[t - step (taps - 1)]`` hold.

    Aggregation over a regular lattice of offsets (a weekly total of daily data, one channel of an
    interleaved stream summed over time, a column of a table summed down its rows): a dilation equal
    to the step holds exactly the taps, a window or a dense pattern holds them among three times as
    many other bits that do not count, and another dilation misses some. Bits uniform; classes
    ``0..taps``; positions from ``step (taps - 1)`` on are scored.
    """

    seq_len: int = 256
    seed: int = 0
    step: int = 4
    taps: int = 8

    name = "stride_count"
    vocab_size = 2

    @property
    def n_classes(self) -> int:  # type: ignore[override]
        return self.taps + 1

    def __post_init__(self) -> None:
        if self.step < 1 or self.taps < 1 or self.step * (self.taps - 1) >= self.seq_len:
            raise ValueError(
                f"step={self.step}, taps={self.taps}: need step, taps >= 1 and step (taps - 1) < seq_len={self.seq_len}"
            )

    def generate(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        x = rng.integers(0, 2, size=(n, self.seq_len)).astype(np.int64)
        start = self.step * (self.taps - 1)
        y = np.full(x.shape, IGNORE, dtype=np.int64)
        acc = np.zeros((n, self.seq_len - start), dtype=np.int64)
        for k in range(self.taps):
            acc += x[:, start - self.step * k : self.seq_len - self.step * k]
        y[:, start:] = acc
        return x, y


@dataclasses.dataclass(frozen=True)
class FirstMatch(GeneratedTask):
    """Does this token match the first one? The label at ``t`` says whether ``x[t] == x[0]``.

    A comparison with a fixed anchor at the start (a query checked against the instruction, a
    field against the record's key): every query needs the first token and its own, nothing between,
    so a pattern with global tokens holds exactly that at a window's cost, while a window or a
    dilation sees the first token only while the query is near it. Tokens uniform over ``vocab``;
    every position but the first is scored.
    """

    seq_len: int = 256
    seed: int = 0
    vocab: int = 4

    name = "first_match"
    n_classes = 2

    @property
    def vocab_size(self) -> int:  # type: ignore[override]
        return self.vocab

    def __post_init__(self) -> None:
        if self.vocab < 2 or self.seq_len < 2:
            raise ValueError(f"vocab={self.vocab}, seq_len={self.seq_len}: need vocab >= 2 and seq_len >= 2")

    def generate(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        x = rng.integers(0, self.vocab, size=(n, self.seq_len)).astype(np.int64)
        y = (x == x[:, :1]).astype(np.int64)
        y[:, 0] = IGNORE
        return x, y


TASKS: dict[str, type[GeneratedTask]] = {
    "mqar": MQAR,
    "listops": ListOps,
    "selective_copy": SelectiveCopy,
    "ngram": NGram,
    "delay": Delay,
    "prefix_key": PrefixKey,
    "keyed_delay": KeyedDelay,
    "majority": Majority,
    "prefix_majority": PrefixMajority,
    "segment_header": SegmentHeader,
    "grid": Grid,
    "local_count": LocalCount,
    "prompt_lookup": PromptLookup,
    "variable_lag": VariableLag,
    "column_majority": ColumnMajority,
    "novelty": Novelty,
    "lag_match": LagMatch,
    "repeat": Repeat,
    "local_novelty": LocalNovelty,
    "halve": Halve,
    "interleave": Interleave,
    "block_rank": BlockRank,
    "gap": Gap,
    "token_count": TokenCount,
    "stride_count": StrideCount,
    "first_match": FirstMatch,
}
"""Built-in tasks by name."""

DEFAULT_TASK = "mqar"


def make_task(spec: str | Task = DEFAULT_TASK, **kwargs: Any) -> Task:
    """Resolve a task name (``mqar``, ``listops``, ``selective_copy``), a ``module:callable`` path,
    or an existing :class:`Task` object.

    Keyword arguments (``seq_len``, ``seed``, task-specific ones) are passed to the constructor;
    unknown ones raise ``ValueError`` naming the accepted ones.
    """
    if not isinstance(spec, str):
        if not isinstance(spec, Task):
            raise ValueError(
                f"{spec!r} does not satisfy the Task protocol (name, seq_len, vocab_size, n_classes, data)"
            )
        return spec
    if spec in TASKS:
        cls = TASKS[spec]
        fields = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(kwargs) - fields)
        if bad:
            raise ValueError(f"task {spec!r} has no parameter {', '.join(bad)}: it accepts {', '.join(sorted(fields))}")
        return cls(**kwargs)
    if ":" not in spec:
        raise ValueError(f"task {spec!r} is unknown: use one of {', '.join(TASKS)} or a 'module:callable' path")
    module_name, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"task {spec!r} cannot be imported: {exc}") from exc
    accepted = inspect.signature(factory).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in accepted.values()):
        kwargs = {k: v for k, v in kwargs.items() if k in accepted}
    task = factory(**kwargs)
    if not isinstance(task, Task):
        raise ValueError(f"task {spec!r} returned {type(task).__name__}, which lacks the Task protocol's attributes")
    return task


def check_task(task: Task, *, n: int = 4) -> None:
    """Build ``n`` examples of each split and check them against the :class:`Task` protocol.

    Run before a search starts, so that a task that cannot work is refused in one line instead of
    failing inside every trial. Raises ``ValueError`` naming what is wrong: sizes that are not
    positive integers, data that is not a pair of integer tensors of shape ``(n, seq_len)``, token
    ids outside ``[0, vocab_size)``, targets outside ``[0, n_classes)`` (other than ``-100``), or
    a batch with nothing to score. Exceptions raised by the task's own code propagate.
    """
    name = getattr(task, "name", type(task).__name__)
    for attr in ("seq_len", "vocab_size", "n_classes"):
        value = getattr(task, attr, None)
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"task {name!r}: {attr}={value!r} is invalid: it must be a positive integer")
    L, vocab, classes = int(task.seq_len), int(task.vocab_size), int(task.n_classes)
    for split in ("train", "eval"):
        got = task.data(split, n)  # type: ignore[arg-type]
        where = f"task {name!r}: data({split!r}, {n})"
        if not (isinstance(got, tuple | list) and len(got) == 2):
            raise ValueError(f"{where} returned {type(got).__name__}: it must return a pair (x, y) of tensors")
        for label, t in zip("xy", got, strict=True):
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"{where}: {label} is a {type(t).__name__}: it must be a torch.Tensor")
            if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
                raise ValueError(
                    f"{where}: {label} has dtype {t.dtype}: token ids and targets must be integers (torch.long)"
                )
            if tuple(t.shape) != (n, L):
                raise ValueError(f"{where}: {label} has shape {tuple(t.shape)}: it must be (n, seq_len) = ({n}, {L})")
        x, y = got
        if int(x.min()) < 0 or int(x.max()) >= vocab:
            raise ValueError(
                f"{where}: token ids span [{int(x.min())}, {int(x.max())}]: they must lie in [0, vocab_size={vocab})"
            )
        scored = y != IGNORE
        if not bool(scored.any()):
            raise ValueError(f"{where}: every target is {IGNORE}: some positions must be scored")
        bad = y[scored]
        if int(bad.min()) < 0 or int(bad.max()) >= classes:
            raise ValueError(
                f"{where}: targets span [{int(bad.min())}, {int(bad.max())}]: they must lie in [0, n_classes={classes}) "
                f"or be {IGNORE} where nothing is scored"
            )
