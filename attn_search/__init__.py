"""attn_search: find accuracy-versus-compute optimal attention configurations by really training a
small attention model per trial."""

import sys as _sys
from pathlib import Path as _Path
from typing import Any as _Any

from attn_search.engine.attention import KERNELS, choose_kernel, sparse_attention
from attn_search.engine.config import AttentionConfig, load_config
from attn_search.engine.cost import model_flops
from attn_search.engine.model import AttentionModel, SparseSelfAttention, build_model
from attn_search.engine.patterns import PATTERNS, block_layout, pattern_density, pattern_mask
from attn_search.engine.tasks import TASKS, Task, make_task
from attn_search.engine.trainer import PRESETS, Budget, StopTrial, TrialResult, evaluate, evaluate_many

__version__ = "0.1.0"

# The subpackages attn_search.envs and attn_search.search_spaces live at the top of a clone (envs/,
# search_spaces/) and are mapped into the package at install time (pyproject's package-dir). When
# Python imports this folder of a clone instead of the installed package (a script run from the
# clone's root, Ray workers started there), they are found beside it, so the clone works exactly
# as the installed package does.
_clone_root = _Path(__file__).resolve().parent.parent
if not (_Path(__file__).resolve().parent / "envs").is_dir() and (_clone_root / "envs" / "__init__.py").is_file():
    __path__.append(str(_clone_root))


# The engine needs torch (and numpy) alone: a CUDA image with nothing else can call
# evaluate_many. gymnasium, stable-baselines3, optuna and Ray are imported where they are used.
# The gymnasium env registers when attn_search.envs is imported, and here only if gymnasium is
# already loaded (``import gymnasium, attn_search`` then ``gym.make(...)`` works as before).
if _sys.modules.get("gymnasium") is not None:
    import attn_search.envs  # noqa: F401  (registers attn_search/AttentionSearch-v0)

# The search-side names of the top-level API load on first use (PEP 562): yaml, Optuna's
# neighbours and the report stack stay out of ``import attn_search``.
_LAZY = {
    "hypervolume": "attn_search.search.pareto",
    "pareto_front": "attn_search.search.pareto",
    "SearchSpace": "attn_search.search.space",
    "load_space": "attn_search.search.space",
}


def __getattr__(name: str) -> _Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'attn_search' has no attribute {name!r}")


__all__ = [
    "KERNELS",
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
    "choose_kernel",
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
