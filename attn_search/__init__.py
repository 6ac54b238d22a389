"""attn_search: find accuracy-versus-compute optimal attention configurations by really training a
small attention model per trial."""

from pathlib import Path as _Path

from attn_search.engine.attention import BACKENDS, choose_backend, sparse_attention
from attn_search.engine.config import AttentionConfig, load_config
from attn_search.engine.cost import model_flops
from attn_search.engine.model import AttentionModel, SparseSelfAttention, build_model
from attn_search.engine.patterns import PATTERNS, block_layout, pattern_density, pattern_mask
from attn_search.engine.tasks import TASKS, Task, make_task
from attn_search.engine.trainer import PRESETS, Budget, StopTrial, TrialResult, evaluate, evaluate_many
from attn_search.pareto import hypervolume, pareto_front
from attn_search.space import SearchSpace, load_space

__version__ = "0.1.0"

# The subpackages attn_search.envs and attn_search.search_spaces live at the top of a clone (envs/,
# search_spaces/) and are mapped into the package at install time (pyproject's package-dir). When
# Python imports this folder of a clone instead of the installed package (a script run from the
# clone's root, Ray workers started there), they are found beside it, so the clone works exactly
# as the installed package does.
_clone_root = _Path(__file__).resolve().parent.parent
if not (_Path(__file__).resolve().parent / "envs").is_dir() and (_clone_root / "envs" / "__init__.py").is_file():
    __path__.append(str(_clone_root))


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
    "evaluate_many",
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
