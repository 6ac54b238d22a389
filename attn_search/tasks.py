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

    The eval split is drawn from a generator seeded with ``(seed, 1)``, the train split from
    ``(seed, 0)``; train rows that also occur in eval are dropped and redrawn, so the splits are
    disjoint by construction, not by luck.
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
        rng = np.random.default_rng([self.seed, 1 if split == "eval" else 0])
        if split == "eval":
            return self.generate(rng, n)
        eval_x, _ = self._cached("eval", _EVAL_REF_SIZE)
        seen = set(_row_hashes(eval_x))
        xs, ys, have = [], [], 0
        while have < n:
            x, y = self.generate(rng, n - have)
            fresh = np.array([h not in seen for h in _row_hashes(x)], dtype=bool)
            xs.append(x[fresh])
            ys.append(y[fresh])
            have += int(fresh.sum())
        return np.concatenate(xs), np.concatenate(ys)


# Eval sets are at most this large (the trainer asks for fewer); train rows are checked against it.
_EVAL_REF_SIZE = 2048
_DATA_CACHE: dict[tuple[Any, ...], tuple[np.ndarray, np.ndarray]] = {}


@dataclasses.dataclass(frozen=True)
class MQAR(GeneratedTask):
    """Multi-query associative recall (Arora et al. 2023, "Zoology", arXiv:2312.04927).

    Each sequence holds ``n_pairs`` key-value pairs (a key token followed by its value token) and,
    later, one query per pair: the key token again. At the query position the model must output
    the value. Everything else is a pad token. Unlike Zoology's layout (all pairs first), the
    key-to-query distance is drawn uniformly from ``[2, seq_len - 1]`` and the pair placed so it
    fits, so distances cover the whole sequence: a window of ``w`` keys can answer only about a
    ``w / seq_len`` share of queries, while dense attention can answer all of them.

    Tokens: 0 pad, ``1..n_keys`` keys, ``n_keys+1..n_keys+n_values`` values. Classes: the value
    index ``0..n_values-1``.
    """

    seq_len: int = 256
    seed: int = 0
    n_pairs: int = 32
    n_keys: int = 64
    n_values: int = 32

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
        if 3 * self.n_pairs > self.seq_len:
            raise ValueError(
                f"seq_len={self.seq_len} is too short for n_pairs={self.n_pairs}: need >= {3 * self.n_pairs}"
            )

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
            for _ in range(1000):
                d = rng.integers(2, L, size=len(todo))  # query - key position, in [2, L - 1]
                p = (rng.random(len(todo)) * (L - d)).astype(np.int64)
                ok = ~(used[todo, p] | used[todo, p + 1] | used[todo, p + d])
                pos[todo[ok]], dist[todo[ok]] = p[ok], d[ok]
                todo = todo[~ok]
                if len(todo) == 0:
                    break
            else:  # pragma: no cover - only for absurdly crowded sequences
                raise RuntimeError("could not place an MQAR pair; lower n_pairs")
            for at in (pos, pos + 1, pos + dist):
                used[rows, at] = True
            x[rows, pos] = 1 + keys[:, j]
            x[rows, pos + 1] = 1 + self.n_keys + values[:, j]
            x[rows, pos + dist] = 1 + keys[:, j]
            y[rows, pos + dist] = values[:, j]
        return x, y


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
        r = 0
        while r < n:
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


TASKS: dict[str, type[GeneratedTask]] = {"mqar": MQAR, "listops": ListOps, "selective_copy": SelectiveCopy}
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
