"""``open_index``: the one way to open an index, shared per process.

The settings' ``backend`` picks the implementation from ``BACKENDS`` (name → opener). Vectors of
different models must never mix, so the model id is part of where the data lives:

* ``edge``: ``<settings.dir>/model-<slug>/`` (a generation directory per model; the manifest
  inside also records the model id and dimension and refuses a mismatch).
* ``qdrant``: collection ``<settings.collection>__<slug>``. ``settings.collection`` itself is left
  free to be the alias of the serving model's collection (``index.state``). ``url = ":memory:"``
  runs qdrant-client's local mode.

``slug`` = the model id made filesystem/collection safe plus a short hash of the raw id, so two ids
that sanitise alike still get different homes.

Opened indexes are shared within a process and reference-counted: an Edge generation is a
directory that only one opener may hold (its WAL is locked), so the ingest task, the re-embed and
the query side of one process must share one ``EdgeIndex``; Qdrant generations share one client per
server, as aliases and ``":memory:"`` data are per client. ``open_index`` returns a handle whose
``close()`` releases this caller's reference; the index closes with its last one.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from index.base import VECTOR_NAME, IndexBackendError, VectorIndex
from index.settings import EdgeIndexSettings, IndexSettings, QdrantIndexSettings


def model_slug(model_id: str) -> str:
    if not model_id:
        raise IndexBackendError("model_id is required: index data of different models must not mix")
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", model_id).strip("-.")[:48] or "model"
    return f"{safe}-{hashlib.sha256(model_id.encode()).hexdigest()[:8]}"


def generation_dir(settings: EdgeIndexSettings, model_id: str) -> Path:
    """Edge directory of ``model_id``'s generation."""
    return Path(settings.dir) / f"model-{model_slug(model_id)}"


def collection_for(settings: QdrantIndexSettings, model_id: str) -> str:
    """Qdrant collection of ``model_id``'s generation."""
    return f"{settings.collection}__{model_slug(model_id)}"


def deployment_key(settings: IndexSettings) -> tuple[str, ...]:
    """What identifies one deployment's data (one pointer file, one alias)."""
    if isinstance(settings, EdgeIndexSettings):
        return ("edge", str(Path(settings.dir).resolve()))
    return ("qdrant", settings.url, settings.collection)


# --- shared qdrant clients ---------------------------------------------------------------------------

@dataclass
class _Shared:
    obj: Any
    refs: int = 0


_lock = threading.RLock()
_clients: dict[tuple[str, str], _Shared] = {}
_indexes: dict[tuple[str, ...], _Shared] = {}


def _client_key(settings: QdrantIndexSettings) -> tuple[str, str]:
    return settings.url, settings.api_key.get_secret_value()


def acquire_client(settings: QdrantIndexSettings) -> Any:
    """The process's ``QdrantClient`` for this server (pair with ``release_client``)."""
    from qdrant_client import QdrantClient

    key = _client_key(settings)
    with _lock:
        entry = _clients.get(key)
        if entry is None:
            client = (QdrantClient(location=":memory:") if settings.url == ":memory:"
                      else QdrantClient(url=settings.url, api_key=settings.api_key.get_secret_value() or None,
                                        timeout=int(settings.timeout_s)))
            entry = _clients[key] = _Shared(client)
        entry.refs += 1
        return entry.obj


def release_client(settings: QdrantIndexSettings) -> None:
    with _lock:
        key = _client_key(settings)
        entry = _clients.get(key)
        if entry is None:
            return
        entry.refs -= 1
        if entry.refs <= 0:
            del _clients[key]
            entry.obj.close()


# --- the backends ------------------------------------------------------------------------------------

def _search_options(settings: IndexSettings) -> dict[str, Any]:
    """HNSW and quantization options, named alike by both backends."""
    return dict(hnsw_m=settings.hnsw_m, hnsw_ef_construct=settings.hnsw_ef_construct, hnsw_ef=settings.hnsw_ef,
                quantization=None if settings.quantization == "none" else settings.quantization,
                rescore=settings.quantization_rescore, oversampling=settings.quantization_oversampling)


def _open_edge(settings: EdgeIndexSettings, dim: int, model_id: str, text_dim: int) -> VectorIndex:
    from index.edge import EdgeIndex

    return EdgeIndex(generation_dir(settings, model_id), dim, text_dim=text_dim, model_id=model_id,
                     **_search_options(settings), max_shards=settings.max_shards)


def _open_qdrant(settings: QdrantIndexSettings, dim: int, model_id: str, text_dim: int) -> VectorIndex:
    from index.qdrant import QdrantIndex

    options: dict[str, Any] = dict(**_search_options(settings), max_shards=settings.max_shards)
    if settings.url != ":memory:":
        options.update(replication_factor=settings.replication_factor,
                       write_consistency_factor=settings.write_consistency_factor,
                       shards_per_key=settings.shards_per_key)
    client = acquire_client(settings)
    try:
        return QdrantIndex(client, collection_for(settings, model_id), dim, text_dim=text_dim,
                           on_close=lambda: release_client(settings), **options)
    except Exception:
        release_client(settings)
        raise


BACKENDS: dict[str, Callable[[Any, int, str, int], VectorIndex]] = {"edge": _open_edge, "qdrant": _open_qdrant}


# --- the one way to open ---------------------------------------------------------------------------

def open_index(settings: IndexSettings, dim: int, *, model_id: str, text_dim: int = 0) -> VectorIndex:
    """This process's shared index of ``model_id``'s generation (opened, or created, on first use),
    as a handle whose ``close()`` releases this reference. ``text_dim``: the title vectors' size
    (0: none); the generation records it, and refuses to open with another."""
    key = (*deployment_key(settings), model_id)
    with _lock:
        entry = _indexes.get(key)
        if entry is None:
            opener = BACKENDS.get(settings.backend)
            if opener is None:
                raise IndexBackendError(f"unknown index backend {settings.backend!r}; known: {sorted(BACKENDS)}")
            entry = _indexes[key] = _Shared(opener(settings, dim, model_id, text_dim))
        elif entry.obj.dim != dim:
            raise IndexBackendError(f"generation {model_id!r} holds {entry.obj.dim}-d vectors, asked for {dim}")
        elif entry.obj.text_dim != text_dim:
            raise IndexBackendError(f"generation {model_id!r} holds {entry.obj.text_dim}-d title vectors, "
                                    f"asked for {text_dim}")
        entry.refs += 1
        return IndexHandle(key, entry.obj)


def close_generation(settings: IndexSettings, model_id: str) -> None:
    """Close ``model_id``'s shared index now, whoever holds it (before its data is dropped)."""
    with _lock:
        entry = _indexes.pop((*deployment_key(settings), model_id), None)
    if entry is not None:
        entry.obj.close()


def _release(key: tuple[str, ...], index: VectorIndex) -> None:
    with _lock:
        entry = _indexes.get(key)
        if entry is None or entry.obj is not index:
            return
        entry.refs -= 1
        if entry.refs > 0:
            return
        del _indexes[key]
    index.close()


class IndexHandle(VectorIndex):
    """One caller's reference to a shared index: every call goes to it, ``close()`` releases."""

    def __init__(self, key: tuple[str, ...], index: VectorIndex) -> None:
        self._key, self._index, self._released = key, index, False
        self.dim, self.text_dim = index.dim, index.text_dim

    @property
    def shared(self) -> VectorIndex:
        """The shared index itself (identity checks: two handles, one index)."""
        return self._index

    def __getattr__(self, name: str) -> Any:  # backend extras: indexed_vectors_count, point_alias, ...
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._index, name)

    def upsert(self, points):
        return self._index.upsert(points)

    def delete(self, item_ids, version=None):
        return self._index.delete(item_ids, version)

    def retrieve(self, item_ids, *, with_vectors=False):
        return self._index.retrieve(item_ids, with_vectors=with_vectors)

    def stored_versions(self, item_ids):
        return self._index.stored_versions(item_ids)

    def search(self, vector, *, limit=10, shards=None, where=None, using=VECTOR_NAME):
        return self._index.search(vector, limit=limit, shards=shards, where=where, using=using)

    def search_batch(self, vectors, *, limit=10, shards=None, where=None, using=VECTOR_NAME):
        return self._index.search_batch(vectors, limit=limit, shards=shards, where=where, using=using)

    def count(self, shard=None):
        return self._index.count(shard)

    def shards(self):
        return self._index.shards()

    def scan(self, *, batch=256, shard=None, with_vectors=False):
        return self._index.scan(batch=batch, shard=shard, with_vectors=with_vectors)

    def flush(self) -> None:
        self._index.flush()

    def optimize(self) -> None:
        self._index.optimize()

    def close(self) -> None:
        if not self._released:
            self._released = True
            _release(self._key, self._index)
