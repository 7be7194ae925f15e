"""``VectorIndex``: the one interface every index implementation offers.

Design rules (shared by all implementations, checked by the same tests over each):

* Point ids derive from item ids (``point_id_for``: UUIDv5), so a redelivered write is harmless.
* The payload lives in the index: item id, version, title, category path, image hashes, model id.
  No side files.
* Each item lives in exactly one shard: its top-level category. Moving an item to another category
  removes it from the old shard.
* Shard keys are logical: ``shards()``, ``search(shards=...)``, ``count(shard)`` and ``scan`` see
  categories. Physically there are at most ``max_shards`` shards: the categories past the cap share
  one overflow shard and are told apart there by the payload ``shard`` key (``index.placement``).
* Writes are version-guarded: a write whose version is lower than the stored one (live point or
  tombstone) is skipped; an equal version overwrites a live point (idempotent redelivery).
* Deletes leave a tombstone (payload ``deleted=True`` with the delete's version) so that a late,
  older upsert cannot resurrect the item. A tombstone also blocks an upsert of *equal* version: a
  delete with ``version=None`` takes the stored version, and the redelivered create of that same
  version must not bring the item back. Tombstones never appear in search, retrieve or count.
* A point may also carry a title vector (``TITLE_VECTOR``, ``IndexPoint.title_vector``) where the
  index was opened with ``text_dim > 0``: the second named vector of the same point, searched with
  ``search(..., using=TITLE_VECTOR)``. It is optional per point (an item without a title has none;
  such a point is found by image only) and lives and dies with the point. The generation records
  ``text_dim`` and refuses to open with another (a new text model means a new generation).
* Tombstones carry no vector (they are outside the vector space, so ``limit`` is never eaten by
  them); a delete of an id the index has never seen is kept in the reserved shard
  ``TOMBSTONE_SHARD``, which ``shards()`` does not list and callers may not write to (nor to
  ``OVERFLOW_SHARD``, the physical name of the shared shard).
* ``where`` filters match payload values exactly: ``str`` or ``int`` (a list = any of), or a
  ``Range`` of numbers (``gte``/``lte``, either open; a point without the key does not match).
  ``bool`` and ``float`` match values are refused (``IndexBackendError``): Qdrant Edge 0.9 converts
  a Python ``bool`` match value to ``int`` and silently matches nothing, and Qdrant has no float
  match (a float belongs in a ``Range``).
"""

from __future__ import annotations

import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

_NAMESPACE = uuid.UUID("8f6b3c2e-6a3e-5d7c-9c1d-7a9e0d3b1f42")

# Payload keys with a meaning to the index itself.
VERSION_KEY = "version"
ITEM_ID_KEY = "item_id"
DELETED_KEY = "deleted"
SHARD_KEY = "shard"
# Named vector used by every implementation (named, so tombstones can have none).
VECTOR_NAME = "image"
# The optional second named vector: the item's title, embedded by the text model (vision.text).
TITLE_VECTOR = "title"
# Reserved shard for tombstones of ids that were never stored (a delete before its create).
TOMBSTONE_SHARD = "__tombstones__"
# Reserved name of the physical shard shared by the categories past ``max_shards`` (index.placement).
OVERFLOW_SHARD = "__overflow__"


def point_id_for(item_id: str) -> str:
    """Deterministic point id (UUID string) for an item id."""
    return str(uuid.uuid5(_NAMESPACE, item_id))


@dataclass(frozen=True)
class Range:
    """A ``where`` value: ``gte <= payload[key] <= lte`` (None: open on that side)."""

    gte: float | None = None
    lte: float | None = None


@dataclass(frozen=True)
class IndexPoint:
    item_id: str
    shard: str
    vector: np.ndarray
    payload: Mapping[str, Any] = field(default_factory=dict)
    version: int = 0
    title_vector: np.ndarray | None = None  # only where the index has ``text_dim > 0``


@dataclass(frozen=True)
class IndexRecord:
    item_id: str
    shard: str
    payload: dict[str, Any]
    version: int
    vector: np.ndarray | None = None


@dataclass(frozen=True)
class SearchHit:
    item_id: str
    shard: str
    score: float
    payload: dict[str, Any]


@dataclass(frozen=True)
class WriteResult:
    """Item ids whose write was applied, and those skipped as older than what is stored. A delete
    with ``version=None`` of an id the index has never seen is in neither list (nothing to do)."""

    applied: list[str] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)


class IndexBackendError(RuntimeError):
    """The index refused or failed an operation (bad dimension, closed index, backend error)."""


class VectorIndex(ABC):
    """Sharded vector index with payloads. Vectors are L2-normalised; scores are cosine similarity.
    ``dim``: the image vectors' dimension; ``text_dim``: the title vectors' (0: the index has none)."""

    dim: int
    text_dim: int = 0

    @abstractmethod
    def upsert(self, points: Sequence[IndexPoint]) -> WriteResult:
        """Insert or replace points, skipping those older than what is stored (see module doc)."""

    @abstractmethod
    def delete(self, item_ids: Sequence[str], version: int | Sequence[int] | None = None) -> WriteResult:
        """Delete items, leaving version tombstones. ``version=None`` deletes unconditionally
        (tombstone version = stored version). Unknown ids are not an error: they are tombstoned too
        when a version is given (a delete may arrive before its create). ``version`` may be one
        int for all ids or one per id."""

    @abstractmethod
    def retrieve(self, item_ids: Sequence[str], *, with_vectors: bool = False) -> list[IndexRecord]:
        """Live records for the ids that exist (unknown and deleted ids are omitted), in input order."""

    @abstractmethod
    def stored_versions(self, item_ids: Sequence[str]) -> dict[str, int]:
        """Stored version per id, tombstones included (for compare-before-write by callers)."""

    @abstractmethod
    def search(
        self,
        vector: np.ndarray,
        *,
        limit: int = 10,
        shards: Sequence[str] | None = None,
        where: Mapping[str, Any] | None = None,
        using: str = VECTOR_NAME,
    ) -> list[SearchHit]:
        """Nearest live points by cosine similarity, best first, across ``shards`` (None = all:
        scatter-gather). ``where`` matches payload keys exactly (a list value = any of). ``using``:
        which named vector to compare with (``TITLE_VECTOR``: a text query of ``text_dim``)."""

    def search_batch(
        self,
        vectors: np.ndarray | Sequence[np.ndarray],
        *,
        limit: int = 10,
        shards: Sequence[str] | None = None,
        where: Mapping[str, Any] | None = None,
        using: str = VECTOR_NAME,
    ) -> list[list[SearchHit]]:
        """``search`` for several vectors at once (one result list per vector, in order). Backends
        override it to run the queries as one planned batch / one round trip."""
        return [self.search(v, limit=limit, shards=shards, where=where, using=using) for v in vectors]

    @abstractmethod
    def count(self, shard: str | None = None) -> int:
        """Number of live points (tombstones excluded), in one shard or all."""

    @abstractmethod
    def shards(self) -> list[str]:
        """Known shard keys, sorted."""

    @abstractmethod
    def scan(
        self, *, batch: int = 256, shard: str | None = None, with_vectors: bool = False
    ) -> Iterator[list[IndexRecord]]:
        """Page through the live records (tombstones excluded), shard by shard, pages of at most
        ``batch``. Each live item is yielded once (an item caught mid-move only from the shard
        holding its winning copy). Not a snapshot: points written meanwhile may or may not appear
        (the blue/green re-embed relies on dual writes for those, not on the scan)."""

    def flush(self) -> None:  # noqa: B027 - optional for implementations
        """Persist pending writes (no-op where writes are durable on return)."""

    def optimize(self) -> None:  # noqa: B027 - optional for implementations
        """Build pending vector indexes (HNSW) now. Not needed for correctness: new points are
        searchable on return from ``upsert``; this only makes later searches faster. A no-op where
        the backend optimizes in the background (a Qdrant server)."""

    @abstractmethod
    def close(self) -> None:
        """Flush and release resources; the object is unusable afterwards."""

    def __enter__(self) -> VectorIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
