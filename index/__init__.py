"""The vector index: one interface (``VectorIndex``), an embedded Qdrant Edge implementation and a
Qdrant cluster implementation (qdrant-client)."""

from index.base import IndexPoint, IndexRecord, SearchHit, VectorIndex, point_id_for

__all__ = ["IndexPoint", "IndexRecord", "SearchHit", "VectorIndex", "point_id_for"]
