from __future__ import annotations

import pytest
import torch

from attn_search import attention


@pytest.fixture
def eager_flex(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run FlexAttention uncompiled: same BlockMask semantics, no per-case compile."""
    monkeypatch.setattr(attention, "FLEX_COMPILE", False)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
