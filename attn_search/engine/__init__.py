"""What is scored: the trial engine.

A configuration (:class:`AttentionConfig`), the attention patterns and their kernels, the small
model, the generated tasks, the trainer (:func:`evaluate`; :func:`evaluate_many` trains several
configurations as one population), the compute figures, and the recorded
table that can stand in for training (:class:`TableEvaluator`). Nothing here knows about searches,
strategies or backends (where trials run).
"""

from attn_search.engine.attention import KERNELS, choose_kernel, sparse_attention
from attn_search.engine.config import AttentionConfig, load_config
from attn_search.engine.cost import model_flops
from attn_search.engine.model import AttentionModel, SparseSelfAttention, build_model
from attn_search.engine.patterns import PATTERNS, block_layout, pattern_density, pattern_mask
from attn_search.engine.tasks import TASKS, Task, check_task, make_task
from attn_search.engine.trainer import PRESETS, Budget, StopTrial, TrialResult, evaluate, evaluate_many

__all__ = [
    "KERNELS",
    "PATTERNS",
    "PRESETS",
    "TASKS",
    "AttentionConfig",
    "AttentionModel",
    "Budget",
    "SparseSelfAttention",
    "StopTrial",
    "Task",
    "TrialResult",
    "block_layout",
    "build_model",
    "check_task",
    "choose_kernel",
    "evaluate",
    "evaluate_many",
    "load_config",
    "make_task",
    "model_flops",
    "pattern_density",
    "pattern_mask",
    "sparse_attention",
]
