from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from attn_search.engine import attention


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


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[tuple[object, str]]:
    """One Ray head (2 CPUs) in a loopback-only namespace, shared by every test that joins a running
    cluster: (the namespace, its address). Started only if a test asks for it."""
    from .raycluster import Loopback, start_head

    ns = Loopback()
    try:
        yield ns, start_head(ns, 6395, cpus=2)
    finally:
        ns.close()


@pytest.fixture
def flex_compiles(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """FlexAttention compiled through a counting compiler backend: ``["n"]`` counts its compiles."""
    import torch
    from torch._inductor.compile_fx import compile_fx
    from torch.nn.attention.flex_attention import flex_attention

    from attn_search.engine import attention

    compiles = {"n": 0}

    def counting(gm: torch.fx.GraphModule, inputs: list[torch.Tensor]) -> object:
        compiles["n"] += 1
        return compile_fx(gm, inputs)

    torch._dynamo.reset()
    monkeypatch.setattr(attention, "_FLEX_COMPILED", torch.compile(flex_attention, dynamic=False, backend=counting))
    return compiles


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """A PostgreSQL server on loopback (see tests/pgserver.py); skips, saying why, where none can be had."""
    from . import pgserver

    why = pgserver.unavailable()
    if why:
        pytest.skip(why)
    with pgserver.server() as base:
        yield base


@pytest.fixture
def postgres_url(postgres_server: str) -> Iterator[str]:
    """A fresh database of its own for one test: its ``postgresql://`` URL; dropped afterwards, so
    that a long-lived server (CI's) does not collect them."""
    from . import pgserver

    url = pgserver.new_database(postgres_server)
    yield url
    pgserver.drop_database(url)
