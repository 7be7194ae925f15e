"""``EdgeIndex``: the embedded default, on Qdrant Edge (``qdrant_edge.EdgeShard``), no server.

Layout under ``root`` (one directory per model generation, chosen by ``index.factory``)::

    root/manifest.json          {"format", "dim", "text_dim", "model_id", "shards": {dir name: key},
                                 "shared": {"__overflow__": [shard keys]}}
    root/shards/<dir name>/     one EdgeShard per shard key (top-level category) ...
    root/shards/__overflow__/   ... up to ``max_shards`` in all: later keys share this one

Directory names are ``<slug>-<sha256[:16]>`` of the key (filesystem-safe, distinct on
case-insensitive filesystems; never ``__overflow__``); the real key is in the manifest and in every
point's payload, which is how the keys sharing ``__overflow__`` are told apart (``index.placement``).
A manifest with ``shared`` keys is format 2, so code from before the cap refuses it rather than
silently missing those categories; without any, it stays format 1.

Qdrant Edge 0.9 behaviour this relies on (checked by tests/index):

* There is no background optimizer: points land in an appendable plain segment and are searchable
  (brute force) as soon as ``update`` returns; HNSW and quantization are only built by
  ``EdgeShard.optimize()`` (``EdgeIndex.optimize``), after which new points again go to a plain
  segment and are searchable at once. ``info().indexed_vectors_count`` stays 0 until then.
* ``MatchValue(True)`` is stored as the int 1 and never matches a bool payload, so tombstones are
  kept out of search and count by having no vector (``HasVectorCondition``), not by ``deleted``.
* ``EdgeShard.load(path, config)`` checks ``config`` against the segments (a different vector size
  fails) and then overwrites the stored config, so HNSW/quantization options apply on reopen.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from pathlib import Path
from typing import Any, Literal

import numpy as np
import qdrant_edge as qe

from index.base import (
    OVERFLOW_SHARD,
    SHARD_KEY,
    TITLE_VECTOR,
    TOMBSTONE_SHARD,
    VECTOR_NAME,
    IndexBackendError,
    Range,
    SearchHit,
)
from index.guarded import GuardedIndex, PutPoint, StoredPoint, Where
from index.placement import DEFAULT_MAX_SHARDS, ShardPlacement
from index.settings import DEFAULT_OVERSAMPLING

_FORMAT = 1  # dedicated shards only
_FORMAT_SHARED = 2  # and keys in the overflow shard ("shared")
OVERFLOW_DIR = OVERFLOW_SHARD  # no shard_dir_name: those all end in "-<16 hex digits>"


Quantization = Literal["int8", "binary"]


def _quantization_config(quantization: Quantization | None) -> Any:
    if quantization is None:
        return None
    if quantization == "int8":
        # quantile 0.99: the per-collection int8 range ignores the 1% most extreme components.
        return qe.ScalarQuantizationConfig(type=qe.ScalarType.Int8, quantile=0.99, always_ram=True)
    if quantization == "binary":
        # One bit per dimension, the query kept at 8 bits (asymmetric): at 512-d and oversampling 8,
        # recall@10 0.95 vs 0.90 with 1-bit queries; 2-bit vectors gained 0.01 for 1.3x the time.
        return qe.BinaryQuantizationConfig(
            always_ram=True, encoding=qe.BinaryQuantizationEncoding.OneBit,
            query_encoding=qe.BinaryQuantizationQueryEncoding.Scalar8Bits,
        )
    raise IndexBackendError(f"EdgeIndex quantization must be None, 'int8' or 'binary', got {quantization!r}")


def edge_config(
    dim: int,
    *,
    text_dim: int = 0,
    hnsw_m: int = 16,
    hnsw_ef_construct: int = 100,
    quantization: Quantization | None = None,
    indexing_threshold_kb: int | None = None,
    full_scan_threshold_kb: int = 10_000,
    max_search_threads: int | None = None,
) -> qe.EdgeConfig:
    """The config of every shard of an ``EdgeIndex`` (the cosine vector ``VECTOR_NAME`` and, with
    ``text_dim``, ``TITLE_VECTOR``); public so that ``offline.bench.query_engines`` measures exactly
    what the index runs."""
    vectors = {VECTOR_NAME: qe.EdgeVectorParams(size=dim, distance=qe.Distance.Cosine)}
    if text_dim:
        vectors[TITLE_VECTOR] = qe.EdgeVectorParams(size=text_dim, distance=qe.Distance.Cosine)
    return qe.EdgeConfig(
        vectors=vectors,
        hnsw_config=qe.HnswIndexConfig(
            m=hnsw_m, ef_construct=hnsw_ef_construct, full_scan_threshold=full_scan_threshold_kb
        ),
        quantization_config=_quantization_config(quantization),
        optimizers=(
            qe.EdgeOptimizersConfig(indexing_threshold=indexing_threshold_kb)
            if indexing_threshold_kb is not None
            else None
        ),
        max_search_threads=max_search_threads,
    )


def search_params(
    hnsw_ef: int, quantization: Quantization | None, *, rescore: bool = True, oversampling: float | None = None
) -> qe.SearchParams:
    """Search-time parameters matching ``edge_config``: the HNSW beam and, with quantization,
    whether and how widely (None: ``DEFAULT_OVERSAMPLING``) the quantized candidates are rescored
    with the float vectors."""
    if not quantization:
        return qe.SearchParams(hnsw_ef=hnsw_ef)
    quant = qe.QuantizationSearchParams(
        rescore=rescore, oversampling=oversampling or DEFAULT_OVERSAMPLING[quantization]
    )
    return qe.SearchParams(hnsw_ef=hnsw_ef, quantization=quant)


def shard_dir_name(key: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", key).strip("-")[:40] or "shard"
    return f"{slug}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def _conditions(where: Where, keys: list[str] | None = None) -> list[Any]:
    """``where`` as Edge conditions, plus ``shard`` in ``keys`` (the logical keys to pick out of a
    shared shard; None = no such filter)."""
    must: list[Any] = []
    for key, value in where.items():
        if isinstance(value, Range):
            must.append(qe.FieldCondition(key=key, range=qe.RangeFloat(gte=value.gte, lte=value.lte)))
            continue
        match = qe.MatchAny(value) if isinstance(value, list) else qe.MatchValue(value)
        must.append(qe.FieldCondition(key=key, match=match))
    if keys is not None:
        must.append(qe.FieldCondition(key=SHARD_KEY, match=qe.MatchAny(list(keys))))
    return must


def _edge_filter(where: Where, keys: list[str] | None = None) -> qe.Filter | None:
    must = _conditions(where, keys)
    return qe.Filter(must=must) if must else None


def _named_vectors(p: PutPoint) -> dict[str, list[float]]:
    """A point's named vectors (none: a tombstone; the title only where it has one)."""
    if p.vector is None:
        return {}
    return {VECTOR_NAME: p.vector} if p.title is None else {VECTOR_NAME: p.vector, TITLE_VECTOR: p.title}


class EdgeIndex(GuardedIndex):
    """One on-disk EdgeShard per shard key under ``root``, at most ``max_shards`` (None: no cap);
    cosine distance.

    ``hnsw_m``/``hnsw_ef_construct`` shape the graph built by ``optimize()``; ``hnsw_ef`` is the
    search-time beam. ``quantization`` (``edge_config``) keeps quantized copies for the HNSW search;
    with ``rescore=True`` the ``oversampling * limit`` best candidates (None:
    ``DEFAULT_OVERSAMPLING``) are rescored with the float vectors.
    ``indexing_threshold_kb``/``full_scan_threshold_kb``: below these sizes a segment is searched by
    brute force (Qdrant defaults ~10 MB: a few thousand 512-d vectors need no graph at all).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        dim: int,
        *,
        text_dim: int = 0,
        model_id: str = "",
        hnsw_m: int = 16,
        hnsw_ef_construct: int = 100,
        hnsw_ef: int = 128,
        quantization: Quantization | None = None,
        rescore: bool = True,
        oversampling: float | None = None,
        indexing_threshold_kb: int | None = None,
        full_scan_threshold_kb: int = 10_000,
        max_search_threads: int | None = None,
        max_shards: int | None = DEFAULT_MAX_SHARDS,
    ) -> None:
        super().__init__(dim, text_dim)
        self.root = Path(root)
        self.model_id = model_id
        self._config = edge_config(  # first: it refuses an unknown quantization
            dim, text_dim=text_dim, hnsw_m=hnsw_m, hnsw_ef_construct=hnsw_ef_construct, quantization=quantization,
            indexing_threshold_kb=indexing_threshold_kb, full_scan_threshold_kb=full_scan_threshold_kb,
            max_search_threads=max_search_threads,
        )
        self._params = search_params(hnsw_ef, quantization, rescore=rescore, oversampling=oversampling)
        try:
            self._placement = ShardPlacement(max_shards)
        except ValueError as exc:
            raise IndexBackendError(str(exc)) from exc
        self._shards: dict[str, qe.EdgeShard] = {}  # physical shard id (index.placement) -> shard
        self._dirs: dict[str, str] = {}  # physical shard id -> directory name
        self._manifest_lock = threading.Lock()
        self._open()

    # ---- layout -------------------------------------------------------------------------------

    @property
    def _manifest_path(self) -> Path:
        return self.root / "manifest.json"

    def _open(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if self._manifest_path.exists():
            manifest = json.loads(self._manifest_path.read_text())
            if manifest.get("format") not in (_FORMAT, _FORMAT_SHARED):
                raise IndexBackendError(f"{self._manifest_path}: unknown format {manifest.get('format')!r}")
            if manifest["dim"] != self.dim:
                raise IndexBackendError(
                    f"index at {self.root} holds {manifest['dim']}-d vectors, opened with dim={self.dim}"
                )
            if manifest.get("text_dim", 0) != self.text_dim:
                raise IndexBackendError(
                    f"index at {self.root} holds {manifest.get('text_dim', 0)}-d title vectors (0: none), "
                    f"opened with text_dim={self.text_dim}: re-embed into a new generation"
                )
            if manifest.get("model_id", "") != self.model_id:
                raise IndexBackendError(
                    f"index at {self.root} belongs to model {manifest.get('model_id')!r}, "
                    f"opened for {self.model_id!r}"
                )
            shared = manifest.get("shared", {})
            if set(shared) - {OVERFLOW_DIR}:
                raise IndexBackendError(f"{self._manifest_path}: unknown shared shards {sorted(shared)}")
            self._placement = ShardPlacement(
                self._placement.max_shards, manifest["shards"].values(), shared.get(OVERFLOW_DIR, [])
            )
            for dirname, key in manifest["shards"].items():
                self._shards[key] = self._load_or_create(dirname)
                self._dirs[key] = dirname
            if shared.get(OVERFLOW_DIR):
                self._shards[OVERFLOW_SHARD] = self._load_or_create(OVERFLOW_DIR)
                self._dirs[OVERFLOW_SHARD] = OVERFLOW_DIR
        else:
            self._write_manifest()

    def _write_manifest(self) -> None:
        shared = self._placement.shared()
        manifest: dict[str, Any] = {
            "format": _FORMAT_SHARED if shared else _FORMAT,
            "dim": self.dim,
            "text_dim": self.text_dim,
            "model_id": self.model_id,
            "distance": "cosine",
            "shards": {self._dirs[k]: k for k in self._placement.dedicated()},
        }
        if shared:
            manifest["shared"] = {OVERFLOW_DIR: shared}
        tmp = self._manifest_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(manifest, indent=1, ensure_ascii=False))
        os.replace(tmp, self._manifest_path)

    def _load_or_create(self, dirname: str) -> qe.EdgeShard:
        path = self.root / "shards" / dirname
        try:
            if (path / "edge_config.json").exists():
                return qe.EdgeShard.load(str(path), self._config)
            shard = qe.EdgeShard.create(str(path), self._config)
        except Exception as exc:  # qdrant_edge raises plain Exception
            raise IndexBackendError(f"cannot open Edge shard {path}: {exc}") from exc
        # Point lookups by item id (our own point ids are derived, but operators filter by it).
        shard.update(qe.UpdateOperation.create_field_index("item_id", qe.PayloadSchemaType.Keyword))
        if dirname == OVERFLOW_DIR:  # every search, count and drop there filters by the key
            shard.update(qe.UpdateOperation.create_field_index(SHARD_KEY, qe.KeywordIndexParams(is_tenant=True)))
        return shard

    def _shard(self, key: str) -> qe.EdgeShard:
        """The physical shard of logical ``key``, placing the key (and creating the shard) if new."""
        physical = self._placement.physical(key)
        if physical is None:
            with self._manifest_lock:
                physical = self._placement.physical(key)
                if physical is None:
                    # Shard first, manifest second: a crash in between leaves an unlisted directory
                    # that the next create of the same key simply loads. No point is written to a
                    # shard before the manifest lists its key.
                    physical = self._placement.target(key)
                    if physical not in self._shards:
                        dirname = OVERFLOW_DIR if physical == OVERFLOW_SHARD else shard_dir_name(key)
                        self._shards[physical] = self._load_or_create(dirname)
                        self._dirs[physical] = dirname
                    self._placement.place(key)
                    self._write_manifest()
        return self._shards[physical]

    # ---- primitives ---------------------------------------------------------------------------

    def _fetch(self, point_ids: list[str], *, with_vectors: bool) -> dict[str, list[StoredPoint]]:
        out: dict[str, list[StoredPoint]] = {}
        for physical, shard in list(self._shards.items()):
            for rec in shard.retrieve(point_ids, with_payload=True, with_vector=with_vectors):
                payload = dict(rec.payload or {})
                vec = (rec.vector or {}).get(VECTOR_NAME) if with_vectors else None
                key = payload.get(SHARD_KEY, physical) if physical == OVERFLOW_SHARD else physical
                out.setdefault(str(rec.id), []).append(
                    StoredPoint(key, payload, None if vec is None else np.asarray(vec, np.float32))
                )
        return out

    def _put(self, shard: str, points: list[PutPoint]) -> None:
        ops = [qe.Point(p.point_id, _named_vectors(p), p.payload) for p in points]
        self._shard(shard).update(qe.UpdateOperation.upsert_points(ops))

    def _drop(self, shard: str, point_ids: list[str]) -> None:
        physical = self._placement.physical(shard)
        if physical is None:
            return
        if physical == shard:
            op = qe.UpdateOperation.delete_points(list(point_ids))
        else:  # shared: only this key's copies (a move within the shard was an overwrite)
            op = qe.UpdateOperation.delete_points_by_filter(
                qe.Filter(must=[qe.HasIdCondition(set(point_ids)), *_conditions({}, [shard])])
            )
        self._shards[physical].update(op)

    def _request(self, vector: list[float], limit: int, where: Where, keys: list[str] | None,
                 using: str) -> qe.QueryRequest:
        return qe.QueryRequest(
            limit=limit,
            query=qe.Query.Nearest(vector, using=using),
            filter=_edge_filter(where, keys),
            params=self._params,
            with_payload=True,
        )

    @staticmethod
    def _hits(physical: str, points: Any) -> list[SearchHit]:
        hits = []
        for sp in points:
            payload = dict(sp.payload or {})
            hits.append(SearchHit(payload["item_id"], payload.get(SHARD_KEY, physical), float(sp.score), payload))
        return hits

    def _search(
        self, vector: list[float], limit: int, shards: list[str] | None, where: Where, using: str
    ) -> list[SearchHit]:
        hits = []
        for physical, keys in self._placement.plan(shards).items():  # scatter-gather; merged by score
            request = self._request(vector, limit, where, keys, using)
            hits += self._hits(physical, self._shards[physical].query(request))
        return hits

    def _search_batch(
        self, vectors: list[list[float]], limit: int, shards: list[str] | None, where: Where, using: str
    ) -> list[list[SearchHit]]:
        # One planned batch per shard (~2.5x less time per query than one call each for 128 queries).
        out: list[list[SearchHit]] = [[] for _ in vectors]
        for physical, keys in self._placement.plan(shards).items():
            batch = qe.QueryBatchRequest([self._request(v, limit, where, keys, using) for v in vectors])
            for i, points in enumerate(self._shards[physical].query_batch(batch)):
                out[i] += self._hits(physical, points)
        return out

    def _count(self, shard: str | None) -> int:
        total = 0
        for physical, keys in self._placement.plan(None if shard is None else [shard]).items():
            live = qe.Filter(must=[qe.HasVectorCondition(VECTOR_NAME), *_conditions({}, keys)])
            total += self._shards[physical].count(qe.CountRequest(exact=True, filter=live))
        return total

    def _scroll(
        self, shard: str, offset: Any, limit: int, *, with_vectors: bool
    ) -> tuple[list[tuple[str, StoredPoint]], Any]:
        physical = self._placement.physical(shard)
        if physical is None:
            return [], None
        keys = None if physical == shard else [shard]
        request = qe.ScrollRequest(
            offset=offset,
            limit=limit,
            filter=qe.Filter(must=[qe.HasVectorCondition(VECTOR_NAME), *_conditions({}, keys)]),
            with_payload=True,
            with_vector=with_vectors,
        )
        records, next_offset = self._shards[physical].scroll(request)
        page = []
        for rec in records:
            vec = (rec.vector or {}).get(VECTOR_NAME) if with_vectors else None
            page.append(
                (str(rec.id), StoredPoint(shard, dict(rec.payload or {}),
                                          None if vec is None else np.asarray(vec, np.float32)))
            )
        return page, next_offset

    # ---- VectorIndex --------------------------------------------------------------------------

    def shards(self) -> list[str]:
        return [k for k in self._placement.keys() if k != TOMBSTONE_SHARD]

    def flush(self) -> None:
        self._check_open()
        with self._write_lock:
            for shard in self._shards.values():
                shard.flush()

    def optimize(self) -> None:
        """Build HNSW (and int8 copies) for segments past the indexing threshold. Blocking."""
        self._check_open()
        with self._write_lock:
            for shard in self._shards.values():
                shard.optimize()

    def indexed_vectors_count(self) -> int:
        """Vectors covered by an HNSW graph (0 until ``optimize()``): for tests and ops."""
        return sum(s.info().indexed_vectors_count for s in self._shards.values())

    def close(self) -> None:
        with self._write_lock:
            if self._closed:
                return
            self._closed = True
            for shard in self._shards.values():
                shard.flush()
                shard.close()
            self._shards.clear()
