"""Bytes moved per member-step by a population's training step: the grouped head layout (what CUDA
runs) against each member on its own path (no grouping), counted on the CPU.

A ``TorchDispatchMode`` sums, for every aten op of one training step (forward, backward,
optimiser), the bytes of its tensor inputs and outputs: a device-independent proxy of memory
traffic (a fused kernel would move less; both layouts are counted the same way). The grouped
layout is forced with ``member_layout="grouped"``; FlexAttention's kernel is not available for a
CPU backward, so the layout's attention is its dense masked path here (each head group's members
gathered), which overstates what CUDA moves in attention itself. Prints per-member-step megabytes
of both and their ratio; the last line is JSON.

Before the grouped layout, populations ran one layout padded to ``max heads x widest head``
channels (8 x 32 = 256 for members of 64). Measured in the same way at commit 04a66b3: 1774 MB
per member-step at the defaults below (K=8) and 1772 MB at ``--members 16``; the grouped layout
moves 903 MB and 952 MB (1.97x and 1.86x less; per member alone: 994 MB and 1512 MB).

Usage::

    python benchmarks/attention_bytes.py                 # K=8 sparse-space proposals, L=256
    python benchmarks/attention_bytes.py --members 16 --seq-len 128
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch
from gpu_check import proposals  # the same seeded draw of sparse-space proposals (numpy, no Optuna)
from torch.utils._python_dispatch import TorchDispatchMode

from attn_search.engine import trainer as T
from attn_search.engine.tasks import make_task


class ByteCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0
        self.ops = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        for t in torch.utils._pytree.tree_leaves((args, kwargs, out)):
            if isinstance(t, torch.Tensor):
                self.bytes += t.numel() * t.element_size()
        return out


def per_member_step(configs: list[Any], seq_len: int, grouped: bool) -> tuple[float, int]:
    task = make_task("mqar", seq_len=seq_len, n_pairs=seq_len // 8)
    pop = T.Population(list(enumerate(configs)), task, T.PRESETS["default"], torch.device("cpu"), "auto",
                        heads=(2, 8), member_layout="grouped" if grouped else "auto")  # fmt: skip
    pop.train_step()  # plans built, optimiser state allocated
    with ByteCounter() as counter:
        pop.train_step()
    return counter.bytes / len(configs) / 2**20, counter.ops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--members", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    configs = [c.replace(attn_dropout=0.0, dropout=0.0) for c in proposals(args.members, args.seed, attn_dropout=False)]
    heads = sorted({c.n_heads for c in configs})
    grouped, grouped_ops = per_member_step(configs, args.seq_len, grouped=True)
    alone, alone_ops = per_member_step(configs, args.seq_len, grouped=False)
    print(f"{args.members} members (heads {heads}), L={args.seq_len}, batch {configs[0].batch_size}")
    print(f"grouped layout {grouped:9.1f} MB per member-step ({grouped_ops} ops)")
    print(f"per member     {alone:9.1f} MB per member-step ({alone_ops} ops)")
    print(f"ratio          {grouped / alone:9.2f}x")
    print(json.dumps({"members": args.members, "heads": heads, "seq_len": args.seq_len, "grouped_mb": round(grouped, 1),
                      "per_member_mb": round(alone, 1), "ratio": round(grouped / alone, 2)}))  # fmt: skip


if __name__ == "__main__":
    main()
