"""The small attention model a trial trains: a pre-LayerNorm transformer with pattern-sparse
self-attention and a per-position classification head (nanoGPT's layout)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from attn_search.engine.attention import Attend, attention_plan, dropout_mask
from attn_search.engine.config import AttentionConfig
from attn_search.engine.tasks import Task


class Dropout(nn.Module):
    """Inverted dropout with a uniform-threshold mask (:func:`attn_search.engine.attention.dropout_mask`):
    the same function as ``nn.Dropout``, several times cheaper on CPU."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        return x * dropout_mask(x, self.p) * (1.0 / (1.0 - self.p))


def rotary_tables(
    seq_len: int, head_dim: int, *, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables ``(seq_len, head_dim / 2)`` of rotary position embeddings (Su et al.
    2021, arXiv:2104.09864), base 10000."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)  # (L, hs/2)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs ``(x[..., :hs/2], x[..., hs/2:])`` of ``x`` ``(B, nh, L, hs)``."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class SparseSelfAttention(nn.Module):
    """Multi-head self-attention restricted to ``config.pattern``. Input/output ``(B, L, d_model)``.

    Positions enter through rotary embeddings on queries and keys: relative offsets are what a
    sparse pattern is about, and they let a head learn "attend to the previous token" in a few
    steps, which associative recall needs (an induction circuit)."""

    def __init__(self, config: AttentionConfig, *, backend: str = "auto") -> None:
        super().__init__()
        assert config.d_model % config.n_heads == 0, f"n_heads={config.n_heads} must divide d_model={config.d_model}"
        assert config.head_dim % 2 == 0, f"head_dim={config.head_dim} must be even for rotary embeddings"
        self.n_heads = config.n_heads
        self.head_dim = config.head_dim
        self.pattern = config.pattern
        self.causal = config.causal
        self.params = config.pattern_params()
        self.attn_dropout = config.attn_dropout
        self.backend = backend
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.proj = nn.Linear(config.d_model, config.d_model)
        self.resid_drop = Dropout(config.dropout)
        # per (length, device, mode): the attention plan and rotary tables, built on first use so
        # that a training step resolves, looks up and builds nothing (attention_plan)
        self._plans: dict[tuple[Any, ...], tuple[Attend, torch.Tensor, torch.Tensor]] = {}

    def _plan(self, L: int, device: torch.device) -> tuple[Attend, torch.Tensor, torch.Tensor]:
        key = (L, device, self.training, torch.is_grad_enabled())
        plan = self._plans.get(key)
        if plan is None:
            attend = attention_plan(
                self.pattern, L, causal=self.causal, backend=self.backend, device=device,
                dropout_p=self.attn_dropout if self.training else 0.0, training=torch.is_grad_enabled(), **self.params,
            )  # fmt: skip
            plan = self._plans[key] = (attend, *rotary_tables(L, self.head_dim,
                                                              device=device))  # fmt: skip
        return plan

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)  # 3 x (B, L, C)
        q, k, v = (t.view(B, L, self.n_heads, C // self.n_heads).transpose(1, 2) for t in (q, k, v))  # (B, nh, L, hs)
        attend, cos, sin = self._plan(L, x.device)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = attend(q, k, v)  # (B, nh, L, hs)
        y = y.transpose(1, 2).reshape(B, L, C)  # (B, L, C)
        return self.resid_drop(self.proj(y))


class Block(nn.Module):
    def __init__(self, config: AttentionConfig, *, backend: str = "auto") -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(config.d_model)
        self.attn = SparseSelfAttention(config, backend=backend)
        self.ln2 = nn.LayerNorm(config.d_model)
        self.mlp = nn.Sequential(
            nn.Linear(config.d_model, 4 * config.d_model),
            nn.GELU(),
            nn.Linear(4 * config.d_model, config.d_model),
            Dropout(config.dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class AttentionModel(nn.Module):
    """Token (+ previous-token) embeddings, ``n_layers`` blocks (rotary positions), final
    LayerNorm, linear head.

    ``forward(x)`` maps token ids ``(B, L)`` to logits ``(B, L, n_classes)``.
    """

    def __init__(
        self, config: AttentionConfig, *, vocab_size: int, n_classes: int, max_len: int, backend: str = "auto"
    ) -> None:
        super().__init__()
        self.config = config
        self.max_len = max_len
        self.tok_emb = nn.Embedding(vocab_size, config.d_model)
        # Token shift: each position also sees the previous token's (separate) embedding, the
        # simplest of the short causal mixers of modern attention hybrids (RWKV's token shift;
        # Based/Zoology, arXiv:2312.04927, show it is what lets small attention models do
        # associative recall without first growing an induction circuit). Recall accuracy then
        # measures how far attention reaches, which is what a sparsity search trades.
        self.prev_emb = nn.Embedding(vocab_size, config.d_model)
        self.drop = Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(config, backend=backend) for _ in range(config.n_layers)])
        self.ln_f = nn.LayerNorm(config.d_model)
        self.head = nn.Linear(config.d_model, n_classes)
        self.apply(self._init_weights)
        # GPT-2's scaled init of residual projections: keeps the residual stream's variance flat in depth.
        for name, p in self.named_parameters():
            if name.endswith("attn.proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        B, L = idx.shape
        assert self.max_len >= L, f"sequence length {L} exceeds the model's max_len={self.max_len}"
        prev = F.pad(idx[:, :-1], (1, 0))  # (B, L): token at t-1, 0 at t=0
        x = self.drop(self.tok_emb(idx) + self.prev_emb(prev))  # (B, L, C)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))  # (B, L, n_classes)

    def set_backend(self, backend: str) -> None:
        """Switch every attention layer's backend (``auto``, ``reference``, ``blocked``, ``flex``)."""
        for block in self.blocks:
            assert isinstance(block, Block)
            block.attn.backend = backend


def build_model(config: AttentionConfig, task: Task, *, backend: str = "auto") -> AttentionModel:
    """The model ``config`` describes, sized for ``task`` (vocabulary, classes, sequence length).

    Initialisation is seeded by the caller (``torch.manual_seed(config.seed)`` in the trainer).
    """
    return AttentionModel(
        config, vocab_size=task.vocab_size, n_classes=task.n_classes, max_len=task.seq_len, backend=backend
    )


def count_params(model: nn.Module) -> int:
    """Trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def loss_fn(logits: torch.Tensor, y: torch.Tensor, *, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy over scored positions (targets ``-100`` are ignored)."""
    return F.cross_entropy(
        logits.flatten(0, 1).float(), y.flatten(), ignore_index=-100, label_smoothing=label_smoothing
    )
