"""attn_search: find accuracy-versus-compute optimal attention configurations by really training a
small attention model per trial."""

from attn_search.attention import BACKENDS, choose_backend, sparse_attention
from attn_search.config import AttentionConfig, load_config
from attn_search.cost import model_flops
from attn_search.model import AttentionModel, SparseSelfAttention, build_model
from attn_search.pareto import hypervolume, pareto_front
from attn_search.patterns import PATTERNS, block_layout, pattern_density, pattern_mask
from attn_search.space import SearchSpace, load_space
from attn_search.tasks import TASKS, Task, make_task
from attn_search.trainer import PRESETS, Budget, StopTrial, TrialResult, evaluate

__version__ = "0.1.0"


def _register_envs() -> None:
    from attn_search.envs import register

    register()


_register_envs()

# Ray is imported only by the ray backend, when it is used.

__all__ = [
    "BACKENDS",
    "PATTERNS",
    "PRESETS",
    "TASKS",
    "AttentionConfig",
    "AttentionModel",
    "Budget",
    "SearchSpace",
    "SparseSelfAttention",
    "StopTrial",
    "Task",
    "TrialResult",
    "block_layout",
    "build_model",
    "choose_backend",
    "evaluate",
    "hypervolume",
    "load_config",
    "load_space",
    "make_task",
    "model_flops",
    "pareto_front",
    "pattern_density",
    "pattern_mask",
    "sparse_attention",
]
