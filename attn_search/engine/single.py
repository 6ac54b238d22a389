"""A trial of one: the plain model (:mod:`attn_search.engine.plain`, what the Python export writes
out) with the small interface the trainer's :class:`~attn_search.engine.trainer.Population` asks
of a model, so that a lone trial trains, and is timed on, the very layer a user deploys.

The trainer chooses it for a population of one on the ``auto`` kernel and member layout
(:func:`~attn_search.engine.trainer.model_for`); a forced kernel, CUDA's grouped layout or a
population of several trains the member-axis model of :mod:`attn_search.engine.model`. What makes
a lone trial and a population member train alike:

* weights: drawn from the trial's seed in the member model's order and scale
  (:meth:`AttentionModel.init_member`), so both start from the same numbers;
* the optimiser: the same :class:`~attn_search.engine.trainer.MemberAdamW` arithmetic over the
  same parameters (``nn.Linear`` keeps ``(out, in)`` where the member model keeps ``(in, out)``;
  AdamW and per-member clipping are elementwise and a norm, so the layout does not matter);
* data order, schedule and rungs: the population's, as for any member.

``tests/test_single.py`` checks the first point and refills; ``tests/test_population.py`` trains
populations (member model) against lone trials (this one): the same curves to 0.01 and final
losses to 1e-3. Its state dict is a plain model's, which ``load_searched`` loads as it is.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from attn_search.engine.config import AttentionConfig
from attn_search.engine.patterns import pattern_rule
from attn_search.engine.plain import Block, PatternAttention, PatternModel, RuleFactory, rotary, rotate
from attn_search.engine.tasks import Task


def rule_factory(config: AttentionConfig) -> RuleFactory:
    """``config``'s pattern as the plain model takes it: ``rule_of(seq_len, device) -> rule``."""
    params = config.pattern_params()
    return lambda seq_len, device: pattern_rule(config.pattern, seq_len, causal=config.causal, device=device,
                                                **params)  # fmt: skip


class SingleModel(PatternModel):
    """One configuration's :class:`~attn_search.engine.plain.PatternModel`, seen as a population of
    one: ``forward`` also takes token ids ``(1, B, L)`` and returns logits ``(1, B, L, n_classes)``;
    parameters carry no member axis (:attr:`member_axis` is ``False``)."""

    member_axis = False

    def __init__(self, config: AttentionConfig, task: Task) -> None:
        super().__init__(vocab_size=task.vocab_size, n_classes=task.n_classes, d_model=config.d_model,
                         n_heads=config.n_heads, n_layers=config.n_layers, rule_of=rule_factory(config),
                         dropout=config.dropout, attn_dropout=config.attn_dropout)  # fmt: skip
        self.members = [config]
        self.init_member(0, config.seed)

    @property
    def config(self) -> AttentionConfig:
        return self.members[0]

    @torch.no_grad()
    def init_member(self, k: int, seed: int) -> None:
        """Fresh weights from ``seed`` alone, the member model's (:meth:`AttentionModel.init_member`:
        the same generator, modules in the same order, each linear weight drawn ``(in, out)``):
        normal(0, 0.02), GPT-2's 0.02/sqrt(2 n_layers) for the residual projections, biases 0,
        LayerNorms 1 and 0. Copied in place, so an optimiser's views of the parameters stay valid,
        and drawn on the CPU from a generator of its own (the caller's random state is untouched)."""
        assert k == 0, "a single model has one slot"
        gen = torch.Generator().manual_seed(seed)
        residual = 0.02 / math.sqrt(2 * self.config.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                std = residual if name.endswith(("attn.proj", ".out")) else 0.02
                module.weight.copy_(torch.empty(module.weight.shape[::-1]).normal_(0.0, std, generator=gen).T)
                module.bias.zero_()
            elif isinstance(module, nn.Embedding):
                module.weight.copy_(torch.empty(module.weight.shape).normal_(0.0, 0.02, generator=gen))
            elif isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()

    def set_member(self, k: int, config: AttentionConfig) -> None:
        """Slot 0 holds ``config`` (a refill of the same shape: its head count, pattern and rates
        may differ), with its fresh weights."""
        assert k == 0, "a single model has one slot"
        old = self.members[0]
        assert (config.d_model, config.n_layers) == (old.d_model, old.n_layers), "a refill must share the shape"
        self.members[0] = config
        for module in self.modules():
            if isinstance(module, nn.Dropout):
                module.p = config.dropout
            elif isinstance(module, PatternAttention):
                module.n_heads, module.head_dim = config.n_heads, config.d_model // config.n_heads
                module.rule_of, module.attn_dropout = rule_factory(config), config.attn_dropout
                module._plans.clear()  # (built again for the new pattern and head dim on first use)
        self.init_member(0, config.seed)

    def keep_members(self, slots: list[int]) -> None:
        assert slots == [0], "a single model keeps its one member or is dropped"

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if idx.dim() == 3:  # (1, B, L): the population's member axis
            assert idx.shape[0] == 1, "a single model has one member"
            return super().forward(idx[0]).unsqueeze(0)
        return super().forward(idx)


@torch.no_grad()
def attention_probs(model: PatternModel, idx: torch.Tensor) -> torch.Tensor:
    """What each head of the first layer of a plain model attends on the sequence ``idx`` ``(L,)``:
    attention probabilities ``(n_heads, L, L)`` (row: query, column: key; zero outside the
    pattern), computed as the layer computes them (rotary positions, the pattern's mask)."""
    L = idx.shape[-1]
    x = idx.view(1, L)
    prev = F.pad(x[:, :-1], (1, 0))
    block = model.blocks[0]
    assert isinstance(block, Block)
    attn = block.attn
    H, D = attn.n_heads, attn.head_dim
    h = block.ln1(model.tok_emb(x) + model.prev_emb(prev))  # (1, L, C)
    q, k, _ = attn.qkv(h)[0].split(H * D, dim=-1)  # (L, C) each
    q, k = (t.view(L, H, D).transpose(0, 1) for t in (q, k))  # (H, L, D)
    cos, sin = rotary(L, D, device=idx.device)
    scores = rotate(q, cos, sin) @ rotate(k, cos, sin).transpose(-1, -2) / math.sqrt(D)
    positions = torch.arange(L, device=idx.device)
    mask = attn.rule_of(L, idx.device)(positions[:, None], positions[None, :])
    return scores.masked_fill(~mask, float("-inf")).softmax(-1)
