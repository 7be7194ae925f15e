"""``open_index``: the one place that maps ``settings.index_backend`` to an implementation.

Vectors of different models must never mix, so the model id is part of where the data lives:

* ``edge``: ``<settings.index_dir>/model-<slug>/`` (a generation directory per model; the manifest
  inside also records the model id and dimension and refuses a mismatch).
* ``qdrant``: collection ``<settings.qdrant_collection>__<slug>``. ``settings.qdrant_collection``
  itself is left free to become an alias pointing at the serving model's collection
  (``QdrantIndex.point_alias``). ``settings.qdrant_url = ":memory:"`` runs Qdrant's local mode.

``slug`` = the model id made filesystem/collection safe plus a short hash of the raw id, so two ids
that sanitise alike still get different homes.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from index.base import IndexBackendError, VectorIndex
from tongkuan.settings import Settings


def model_slug(model_id: str) -> str:
    if not model_id:
        raise IndexBackendError("model_id is required: index data of different models must not mix")
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", model_id).strip("-.")[:48] or "model"
    return f"{safe}-{hashlib.sha256(model_id.encode()).hexdigest()[:8]}"


def open_index(settings: Settings, dim: int, *, model_id: str, **options: Any) -> VectorIndex:
    """Open (creating if needed) the index for ``model_id`` with ``dim``-d vectors.

    ``options`` go to the implementation's constructor (HNSW, quantization, replication...).
    """
    slug = model_slug(model_id)
    quantization = None if settings.index_quantization == "none" else settings.index_quantization
    options = {
        "hnsw_m": settings.index_hnsw_m,
        "hnsw_ef_construct": settings.index_hnsw_ef_construct,
        "hnsw_ef": settings.index_hnsw_ef,
        "quantization": quantization,
        **options,
    }
    if settings.index_backend == "edge":
        from index.edge import EdgeIndex

        if options["quantization"] == "binary":
            raise IndexBackendError("EdgeIndex supports int8 quantization only (TONGKUAN_INDEX_QUANTIZATION)")
        return EdgeIndex(settings.index_dir / f"model-{slug}", dim, model_id=model_id, **options)
    if settings.index_backend == "qdrant":
        from qdrant_client import QdrantClient

        from index.qdrant import QdrantIndex

        if not settings.qdrant_url:
            raise IndexBackendError("index_backend=qdrant needs TONGKUAN_QDRANT_URL (or ':memory:')")
        client = (
            QdrantClient(location=":memory:")
            if settings.qdrant_url == ":memory:"
            else QdrantClient(
                url=settings.qdrant_url,
                api_key=settings.qdrant_api_key or None,
                timeout=int(settings.qdrant_timeout_s),
            )
        )
        if settings.qdrant_url != ":memory:":
            options = {
                "replication_factor": settings.qdrant_replication_factor,
                "write_consistency_factor": settings.qdrant_write_consistency_factor,
                "shards_per_key": settings.qdrant_shards_per_key,
                **options,
            }
        try:
            return QdrantIndex(
                client, f"{settings.qdrant_collection}__{slug}", dim, owns_client=True, **options
            )
        except Exception:
            client.close()
            raise
    raise IndexBackendError(f"unknown index backend {settings.index_backend!r}")
