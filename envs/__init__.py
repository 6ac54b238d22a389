"""Gymnasium environments of attn_search (installed as ``attn_search.envs``)."""

from __future__ import annotations

ENV_ID = "attn_search/AttentionSearch-v0"


def register() -> None:
    """Register :data:`ENV_ID` with gymnasium (idempotent; run when this package is imported)."""
    import gymnasium

    if ENV_ID not in gymnasium.registry:
        gymnasium.register(id=ENV_ID, entry_point="attn_search.envs.attention_search:AttentionSearchEnv")


register()
