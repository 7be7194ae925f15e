"""``GuardedIndex``: the version guard, tombstones, validation and scatter-gather merge, written once.

A backend subclass only moves points: ``_fetch`` (every stored copy of some point ids, all shards),
``_put`` (write points into one shard; ``vector=None`` is a tombstone; ``title`` the optional
second named vector), ``_drop`` (remove point ids
from one shard), ``_search`` (nearest live points in some shards) and ``_count``. The shard keys
these primitives take and return are logical (categories); which physical shard holds each is the
backend's business (``index.placement``). The rules in ``index.base`` are then the same for every
backend by construction, and the shared test suite checks them over each.

Writes are read-then-write under one in-process lock, so the ingest and the query path may share an
instance. Two *processes* writing the same item at once can still race (last writer wins); the
ingest partitions events by item id, so one item has one writer.

A move to another shard writes the new copy first and drops the old one second: a crash in between
leaves two copies (healed by the next write of that item; search dedupes by item id), never zero.
"""

from __future__ import annotations

import math
import threading
from abc import abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from index.base import (
    DELETED_KEY,
    ITEM_ID_KEY,
    OVERFLOW_SHARD,
    SHARD_KEY,
    TITLE_VECTOR,
    TOMBSTONE_SHARD,
    VECTOR_NAME,
    VERSION_KEY,
    IndexBackendError,
    IndexPoint,
    IndexRecord,
    Range,
    SearchHit,
    VectorIndex,
    WriteResult,
    point_id_for,
)

# A validated ``where``: key -> one value or a non-empty list of values (any of).
Where = dict[str, "str | int | list[str] | list[int]"]


@dataclass(frozen=True)
class StoredPoint:
    """One stored copy of a point, as a backend returns it from ``_fetch``."""

    shard: str
    payload: dict[str, Any]
    vector: np.ndarray | None = None

    @property
    def version(self) -> int:
        return int(self.payload.get(VERSION_KEY, 0))

    @property
    def deleted(self) -> bool:
        return bool(self.payload.get(DELETED_KEY, False))


@dataclass(frozen=True)
class PutPoint:
    point_id: str
    vector: list[float] | None  # None: a tombstone, outside the vector space
    payload: dict[str, Any]
    title: list[float] | None = None  # the title vector, where the index has them


@dataclass
class _State:
    version: int
    deleted: bool
    shard: str


class GuardedIndex(VectorIndex):
    def __init__(self, dim: int, text_dim: int = 0) -> None:
        if not isinstance(dim, int) or dim <= 0:
            raise IndexBackendError(f"dimension must be a positive int, got {dim!r}")
        if not isinstance(text_dim, int) or isinstance(text_dim, bool) or text_dim < 0:
            raise IndexBackendError(f"text dimension must be an int >= 0, got {text_dim!r}")
        self.dim = dim
        self.text_dim = text_dim
        self._write_lock = threading.RLock()
        self._closed = False

    # ---- backend primitives -------------------------------------------------------------------

    @abstractmethod
    def _fetch(self, point_ids: list[str], *, with_vectors: bool) -> dict[str, list[StoredPoint]]:
        """Every stored copy (live or tombstone, any shard) of each point id that exists."""

    @abstractmethod
    def _put(self, shard: str, points: list[PutPoint]) -> None:
        """Write (replace) points into ``shard``, creating the shard on demand."""

    @abstractmethod
    def _drop(self, shard: str, point_ids: list[str]) -> None:
        """Remove the copies of ``point_ids`` held by ``shard`` (and only by it). Where ``shard``
        shares a physical shard with others, filter by the payload ``SHARD_KEY`` too: a move
        between two keys there was an overwrite of the same point id, and must survive this."""

    @abstractmethod
    def _search(
        self, vector: list[float], limit: int, shards: list[str] | None, where: Where, using: str
    ) -> list[SearchHit]:
        """Up to ``limit`` nearest live points from each of ``shards`` (None = all), any order, by
        the named vector ``using`` (points without that vector are not candidates)."""

    def _search_batch(
        self, vectors: list[list[float]], limit: int, shards: list[str] | None, where: Where, using: str
    ) -> list[list[SearchHit]]:
        """``_search`` per vector; backends with a batch query override it."""
        return [self._search(v, limit, shards, where, using) for v in vectors]

    @abstractmethod
    def _count(self, shard: str | None) -> int:
        """Live points (points with a vector) in ``shard`` or in all shards."""

    @abstractmethod
    def _scroll(
        self, shard: str, offset: Any, limit: int, *, with_vectors: bool
    ) -> tuple[list[tuple[str, StoredPoint]], Any]:
        """One page of up to ``limit`` live points (with a vector) of ``shard`` from ``offset``
        (None = the start): ``([(point id, copy)], next offset or None at the end)``."""

    # ---- shared checks ------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise IndexBackendError(f"{type(self).__name__} is closed")

    def _vector(self, vector: Any, using: str = VECTOR_NAME) -> list[float]:
        if using == TITLE_VECTOR:
            if not self.text_dim:
                raise IndexBackendError("this index holds no title vectors (opened with text_dim=0)")
            dim = self.text_dim
        elif using == VECTOR_NAME:
            dim = self.dim
        else:
            raise IndexBackendError(f"unknown vector {using!r}; known: {VECTOR_NAME!r}, {TITLE_VECTOR!r}")
        arr = np.asarray(vector, dtype=np.float32)
        if arr.shape != (dim,):
            raise IndexBackendError(f"{using} vector shape {arr.shape} does not match its dimension {dim}")
        norm = float(np.linalg.norm(arr))
        if not math.isfinite(norm) or norm == 0.0:
            raise IndexBackendError("vector must be finite and non-zero (cosine similarity)")
        return arr.tolist()

    @staticmethod
    def _shard_name(shard: Any) -> str:
        if not isinstance(shard, str) or not shard:
            raise IndexBackendError(f"shard key must be a non-empty str, got {shard!r}")
        if shard in (TOMBSTONE_SHARD, OVERFLOW_SHARD):
            raise IndexBackendError(f"shard key {shard!r} is reserved")
        return shard

    @staticmethod
    def _where(where: Mapping[str, Any] | None) -> Where:
        out: Where = {}
        for key, value in (where or {}).items():
            if isinstance(value, Range):
                if value.gte is None and value.lte is None:
                    raise IndexBackendError(f"where[{key!r}]: a range needs gte or lte")
                if any(b is not None and (isinstance(b, bool) or not isinstance(b, int | float) or b != b)
                       for b in (value.gte, value.lte)):
                    raise IndexBackendError(f"where[{key!r}]: range bounds must be numbers, got {value!r}")
                out[key] = value
                continue
            values = list(value) if isinstance(value, list | tuple | set | frozenset) else [value]
            if not values:
                raise IndexBackendError(f"where[{key!r}]: empty list matches nothing")
            for v in values:
                # bool is an int subclass: refuse it first (see index.base on Edge's bool matching).
                if isinstance(v, bool) or not isinstance(v, str | int):
                    raise IndexBackendError(
                        f"where[{key!r}]: only str/int values (or lists of them) are supported, got {v!r}"
                    )
            if len({type(v) for v in values}) > 1:
                raise IndexBackendError(f"where[{key!r}]: mixed str/int values in one list")
            out[key] = values if isinstance(value, list | tuple | set | frozenset) else values[0]
        return out

    def _states(self, stored: dict[str, list[StoredPoint]]) -> dict[str, _State]:
        """Per point id, the copy with the highest version (a tombstone wins a tie)."""
        states: dict[str, _State] = {}
        for pid, copies in stored.items():
            best = max(copies, key=lambda c: (c.version, c.deleted))
            states[pid] = _State(best.version, best.deleted, best.shard)
        return states

    def _drop_other_copies(self, stored: dict[str, list[StoredPoint]], target_shard: dict[str, str]) -> None:
        drops: dict[str, list[str]] = {}
        for pid, shard in target_shard.items():
            for copy in stored.get(pid, []):
                if copy.shard != shard:
                    drops.setdefault(copy.shard, []).append(pid)
        for shard, pids in drops.items():
            self._drop(shard, pids)

    # ---- VectorIndex --------------------------------------------------------------------------

    def upsert(self, points: Sequence[IndexPoint]) -> WriteResult:
        self._check_open()
        prepared = []
        for p in points:
            if not isinstance(p.version, int) or isinstance(p.version, bool) or p.version < 0:
                raise IndexBackendError(f"{p.item_id}: version must be an int >= 0, got {p.version!r}")
            title = None if p.title_vector is None else self._vector(p.title_vector, TITLE_VECTOR)
            prepared.append((p, self._shard_name(p.shard), self._vector(p.vector), title))
        result = WriteResult()
        if not prepared:
            return result
        with self._write_lock:
            pids = list(dict.fromkeys(point_id_for(p.item_id) for p, _, _, _ in prepared))
            stored = self._fetch(pids, with_vectors=False)
            states = self._states(stored)
            winners: dict[str, tuple[IndexPoint, str, list[float], list[float] | None]] = {}
            for p, shard, vec, title in prepared:
                pid = point_id_for(p.item_id)
                cur = states.get(pid)
                if cur is not None and (
                    p.version < cur.version or (cur.deleted and p.version == cur.version)
                ):
                    result.stale.append(p.item_id)
                    continue
                result.applied.append(p.item_id)
                winners[pid] = (p, shard, vec, title)
                states[pid] = _State(p.version, False, shard)
            by_shard: dict[str, list[PutPoint]] = {}
            for pid, (p, shard, vec, title) in winners.items():
                payload = {k: v for k, v in p.payload.items() if k != DELETED_KEY}
                payload.update({ITEM_ID_KEY: p.item_id, VERSION_KEY: p.version, SHARD_KEY: shard})
                by_shard.setdefault(shard, []).append(PutPoint(pid, vec, payload, title))
            for shard, puts in by_shard.items():
                self._put(shard, puts)
            self._drop_other_copies(stored, {pid: w[1] for pid, w in winners.items()})
        return result

    def delete(self, item_ids: Sequence[str], version: int | Sequence[int] | None = None) -> WriteResult:
        self._check_open()
        ids = list(item_ids)
        if version is None or isinstance(version, int):
            versions: list[int | None] = [version] * len(ids)
        else:
            versions = list(version)
            if len(versions) != len(ids):
                raise IndexBackendError(f"{len(ids)} item ids but {len(versions)} versions")
        for v in versions:
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
                raise IndexBackendError(f"delete version must be an int >= 0, got {v!r}")
        result = WriteResult()
        if not ids:
            return result
        with self._write_lock:
            pids = list(dict.fromkeys(point_id_for(i) for i in ids))
            stored = self._fetch(pids, with_vectors=False)
            states = self._states(stored)
            tombs: dict[str, tuple[str, int, str]] = {}  # pid -> (item id, version, shard)
            for item_id, v in zip(ids, versions, strict=True):
                pid = point_id_for(item_id)
                cur = states.get(pid)
                if v is None:
                    if cur is None:
                        continue  # never seen, no version to guard with: nothing to do
                    v = cur.version
                elif cur is not None and v < cur.version:
                    result.stale.append(item_id)
                    continue
                shard = cur.shard if cur is not None else TOMBSTONE_SHARD
                result.applied.append(item_id)
                tombs[pid] = (item_id, v, shard)
                states[pid] = _State(v, True, shard)
            by_shard: dict[str, list[PutPoint]] = {}
            for pid, (item_id, v, shard) in tombs.items():
                payload = {ITEM_ID_KEY: item_id, VERSION_KEY: v, SHARD_KEY: shard, DELETED_KEY: True}
                by_shard.setdefault(shard, []).append(PutPoint(pid, None, payload))
            for shard, puts in by_shard.items():
                self._put(shard, puts)
            self._drop_other_copies(stored, {pid: t[2] for pid, t in tombs.items()})
        return result

    def retrieve(self, item_ids: Sequence[str], *, with_vectors: bool = False) -> list[IndexRecord]:
        self._check_open()
        pids = {i: point_id_for(i) for i in item_ids}
        if not pids:
            return []
        stored = self._fetch(list(dict.fromkeys(pids.values())), with_vectors=with_vectors)
        records = []
        for item_id in item_ids:
            copies = stored.get(pids[item_id])
            if not copies:
                continue
            best = max(copies, key=lambda c: (c.version, c.deleted))
            if best.deleted:
                continue
            records.append(IndexRecord(item_id, best.shard, dict(best.payload), best.version, best.vector))
        return records

    def stored_versions(self, item_ids: Sequence[str]) -> dict[str, int]:
        self._check_open()
        pids = {i: point_id_for(i) for i in item_ids}
        states = self._states(self._fetch(list(dict.fromkeys(pids.values())), with_vectors=False))
        return {i: states[p].version for i, p in pids.items() if p in states}

    def search(
        self,
        vector: np.ndarray,
        *,
        limit: int = 10,
        shards: Sequence[str] | None = None,
        where: Mapping[str, Any] | None = None,
        using: str = VECTOR_NAME,
    ) -> list[SearchHit]:
        return self.search_batch([vector], limit=limit, shards=shards, where=where, using=using)[0]

    def search_batch(
        self,
        vectors: np.ndarray | Sequence[np.ndarray],
        *,
        limit: int = 10,
        shards: Sequence[str] | None = None,
        where: Mapping[str, Any] | None = None,
        using: str = VECTOR_NAME,
    ) -> list[list[SearchHit]]:
        self._check_open()
        vecs = [self._vector(v, using) for v in vectors]
        if not isinstance(limit, int) or limit < 0:
            raise IndexBackendError(f"limit must be an int >= 0, got {limit!r}")
        flt = self._where(where)
        selected = None
        if shards is not None:
            selected = [s for s in dict.fromkeys(self._shard_name(s) for s in shards) if s in self.shards()]
            if not selected:
                return [[] for _ in vecs]
        if limit == 0 or not vecs:
            return [[] for _ in vecs]
        if len(vecs) == 1:
            found = [self._search(vecs[0], limit, selected, flt, using)]
        else:
            found = self._search_batch(vecs, limit, selected, flt, using)
        return [self._merge_hits(hits, limit) for hits in found]

    @staticmethod
    def _merge_hits(hits: list[SearchHit], limit: int) -> list[SearchHit]:
        """Merge by score; an item caught mid-move in two shards counts once; tombstones never."""
        merged: dict[str, SearchHit] = {}
        for hit in sorted(hits, key=lambda h: -h.score):
            if hit.payload.get(DELETED_KEY) or hit.item_id in merged:
                continue
            merged[hit.item_id] = hit
        return list(merged.values())[:limit]

    def scan(
        self, *, batch: int = 256, shard: str | None = None, with_vectors: bool = False
    ) -> Iterator[list[IndexRecord]]:
        self._check_open()
        if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
            raise IndexBackendError(f"batch must be an int >= 1, got {batch!r}")
        keys = self.shards() if shard is None else [s for s in [self._shard_name(shard)] if s in self.shards()]
        for key in keys:
            offset: Any = None
            while True:
                self._check_open()
                page, offset = self._scroll(key, offset, batch, with_vectors=with_vectors)
                if page:
                    # Keep a copy only if it is the item's winning copy: a stale copy left by an
                    # interrupted move (or shadowed by a newer tombstone elsewhere) is skipped.
                    states = self._states(self._fetch([pid for pid, _ in page], with_vectors=False))
                    records = []
                    for pid, copy in page:
                        st = states.get(pid)
                        if st is None or st.deleted or st.shard != key or st.version != copy.version:
                            continue
                        item_id = str(copy.payload.get(ITEM_ID_KEY, ""))
                        records.append(IndexRecord(item_id, key, dict(copy.payload), copy.version, copy.vector))
                    if records:
                        yield records
                if offset is None:
                    break

    def count(self, shard: str | None = None) -> int:
        self._check_open()
        if shard is not None:
            if shard == TOMBSTONE_SHARD or shard not in self.shards():
                return 0
        return self._count(shard)
