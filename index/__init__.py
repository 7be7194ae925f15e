"""The vector index: one interface (``VectorIndex``), an embedded Qdrant Edge implementation and a
Qdrant cluster implementation (qdrant-client). Open one with ``index.factory.open_index``."""

from index.base import (
    IndexBackendError,
    IndexPoint,
    IndexRecord,
    SearchHit,
    VectorIndex,
    WriteResult,
    point_id_for,
)

__all__ = [
    "IndexBackendError",
    "IndexPoint",
    "IndexRecord",
    "SearchHit",
    "VectorIndex",
    "WriteResult",
    "point_id_for",
]
