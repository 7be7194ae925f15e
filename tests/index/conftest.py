"""One fixture, ``make_index``, over every ``VectorIndex`` implementation that can run here:
EdgeIndex in tmp_path, the same read through ``RemoteIndex`` (``edge-remote``), QdrantIndex on ``QdrantClient(":memory:")`` (shard payload mode), and
QdrantIndex with shard keys on ``ShardedLocalClient`` (a server's custom sharding, emulated)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from qdrant_client import QdrantClient

from index.base import VectorIndex
from index.edge import EdgeIndex
from index.qdrant import QdrantIndex
from tests.index.remote_split import OwnerAndReader
from tests.index.sharded_client import ShardedLocalClient

DIM = 16


@pytest.fixture(params=["edge", "edge-remote", "qdrant-local", "qdrant-sharded"])
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def _client(backend: str) -> Iterator[QdrantClient | ShardedLocalClient | None]:
    client: QdrantClient | ShardedLocalClient | None = None
    if backend == "qdrant-local":
        client = QdrantClient(":memory:")
    elif backend == "qdrant-sharded":
        client = ShardedLocalClient()
    yield client
    if client is not None:
        client.close()


@pytest.fixture
def make_index(backend: str, tmp_path, _client) -> Iterator[Callable[..., VectorIndex]]:
    """``make_index(dim=DIM, **options)``; a second call reopens the same storage."""
    opened: list[VectorIndex] = []

    def make(dim: int = DIM, **options) -> VectorIndex:
        if backend == "edge":
            ix: VectorIndex = EdgeIndex(tmp_path / "edge", dim, **options)
        elif backend == "edge-remote":
            ix = OwnerAndReader(EdgeIndex(tmp_path / "edge", dim, **options))
        else:
            ix = QdrantIndex(_client, "test", dim, **options)  # type: ignore[arg-type]
        opened.append(ix)
        return ix

    yield make
    for ix in opened:
        ix.close()


@pytest.fixture
def physical_shards(backend: str, tmp_path, _client) -> Callable[[], int]:
    """How many physical shards the storage of ``make_index`` holds, read from the storage itself:
    Edge shard directories, Qdrant shard keys, or 1 (local mode's one collection)."""

    def count() -> int:
        if backend in ("edge", "edge-remote"):
            return sum(1 for p in (tmp_path / "edge" / "shards").iterdir() if p.is_dir())
        if backend == "qdrant-sharded":
            return len(_client.list_shard_keys("test").shard_keys)
        return 1

    return count
