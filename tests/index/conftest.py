"""One fixture, ``make_index``, over every ``VectorIndex`` implementation that can run here:
EdgeIndex in tmp_path and QdrantIndex on ``QdrantClient(":memory:")`` (shard payload mode)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from qdrant_client import QdrantClient

from index.base import VectorIndex
from index.edge import EdgeIndex
from index.qdrant import QdrantIndex

DIM = 16


@pytest.fixture(params=["edge", "qdrant-local"])
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def make_index(backend: str, tmp_path) -> Iterator[Callable[..., VectorIndex]]:
    """``make_index(dim=DIM, **options)``; a second call reopens the same storage."""
    opened: list[VectorIndex] = []
    client = QdrantClient(":memory:") if backend == "qdrant-local" else None

    def make(dim: int = DIM, **options) -> VectorIndex:
        if backend == "edge":
            ix: VectorIndex = EdgeIndex(tmp_path / "edge", dim, **options)
        else:
            ix = QdrantIndex(client, "test", dim, **options)
        opened.append(ix)
        return ix

    yield make
    for ix in opened:
        ix.close()
    if client is not None:
        client.close()
