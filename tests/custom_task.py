"""A user's own task, plugged in as ``tests.custom_task:make`` (the Task protocol, nothing more)."""

from __future__ import annotations

import torch


class Parity:
    name = "parity"
    vocab_size = 2
    n_classes = 2

    def __init__(self, seq_len: int = 32, seed: int = 0) -> None:
        self.seq_len = seq_len
        self.seed = seed

    def data(self, split: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 2 + (split == "eval"))
        x = torch.randint(0, 2, (n, self.seq_len), generator=g)
        y = torch.full_like(x, -100)
        y[:, -1] = x.sum(dim=1) % 2
        return x, y


def make(seq_len: int = 32, seed: int = 0) -> Parity:
    return Parity(seq_len=seq_len, seed=seed)


def not_a_task() -> object:
    return object()


def broken(seq_len: int = 32, seed: int = 0) -> Parity:
    """A task whose data generation raises: a trial on it must be recorded as failed, with the reason."""
    raise RuntimeError("broken task: no data today")


class Fragile(Parity):
    """Small batches work (the check before a search passes); a trial's training set does not."""

    def data(self, split: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        if n > 16:
            raise RuntimeError(f"fragile task: cannot make {n} examples")
        return super().data(split, n)


def fragile(seq_len: int = 32, seed: int = 0) -> Fragile:
    return Fragile(seq_len=seq_len, seed=seed)


class FloatTokens(Parity):
    def data(self, split: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = super().data(split, n)
        return x.float(), y


class WrongShape(Parity):
    def data(self, split: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = super().data(split, n)
        return x[:, :-1], y


class TargetsOutOfRange(Parity):
    def data(self, split: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = super().data(split, n)
        return x, y.masked_fill(y >= 0, 7)


def float_tokens() -> Parity:
    return FloatTokens()


def wrong_shape() -> Parity:
    return WrongShape()


def targets_out_of_range() -> Parity:
    return TargetsOutOfRange()
