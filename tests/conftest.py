from __future__ import annotations

import pytest
import torch

from attn_search import attention


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` are deselected (and counted as such in the summary) without CUDA."""
    if torch.cuda.is_available():
        return
    gpu = [item for item in items if item.get_closest_marker("gpu") is not None]
    if gpu:
        config.hook.pytest_deselected(items=gpu)
        items[:] = [item for item in items if item.get_closest_marker("gpu") is None]


@pytest.fixture
def eager_flex(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run FlexAttention uncompiled: same BlockMask semantics, no per-case compile."""
    monkeypatch.setattr(attention, "FLEX_COMPILE", False)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
