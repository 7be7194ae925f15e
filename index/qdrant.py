"""``QdrantIndex``: the cluster implementation, on ``qdrant_client.QdrantClient``.

Two placements of shard keys, chosen by ``use_shard_keys`` (default: auto-detected):

* ``True`` (a Qdrant server): the collection uses ``sharding_method=custom`` and one Qdrant shard key
  per top-level category, created on demand; writes, retrieves and searches name their shard keys,
  and a search over several categories is a server-side scatter-gather. Point ids are only unique
  within a shard key here, so a move between categories drops the old key's copy explicitly.
* ``False`` (``QdrantClient(":memory:")`` / local path mode, which has no custom sharding): one
  plain collection with the key in the ``shard`` payload field and a filter on it. Point ids are
  unique collection-wide, so a move overwrites; ``_drop`` is filtered by shard so it can never
  delete the copy that was just written.

Collections are named by the caller (``index.factory`` bakes the model id in); ``point_alias``
switches a stable alias to this collection atomically (blue/green model switches).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
from qdrant_client import QdrantClient
from qdrant_client import models as qm

from index.base import (
    DELETED_KEY,
    ITEM_ID_KEY,
    SHARD_KEY,
    TOMBSTONE_SHARD,
    VECTOR_NAME,
    IndexBackendError,
    SearchHit,
)
from index.guarded import GuardedIndex, PutPoint, StoredPoint, Where


def is_local_client(client: QdrantClient) -> bool:
    """True for the in-process mode (``":memory:"`` or ``path=``), which has no custom sharding."""
    from qdrant_client.local.qdrant_local import QdrantLocal

    return isinstance(getattr(client, "_client", None), QdrantLocal)


def _conditions(where: Where) -> list[qm.Condition]:
    out: list[qm.Condition] = []
    for key, value in where.items():
        match = qm.MatchAny(any=value) if isinstance(value, list) else qm.MatchValue(value=value)
        out.append(qm.FieldCondition(key=key, match=match))
    return out


class QdrantIndex(GuardedIndex):
    """A Qdrant collection, one shard key (or ``shard`` payload value) per category; cosine.

    ``replication_factor``/``write_consistency_factor`` apply to a new collection (and to each new
    shard key); ``shards_per_key`` is the Qdrant shard count per category. ``quantization``:
    ``"int8"`` (scalar) or ``"binary"``, searched with ``rescore``/``oversampling``.
    ``on_close``: called once when the index closes (the factory releases its shared client).
    """

    def __init__(
        self,
        client: QdrantClient,
        collection: str,
        dim: int,
        *,
        use_shard_keys: bool | None = None,
        shards_per_key: int = 1,
        replication_factor: int = 1,
        write_consistency_factor: int = 1,
        hnsw_m: int = 16,
        hnsw_ef_construct: int = 100,
        hnsw_ef: int = 128,
        quantization: Literal["int8", "binary"] | None = None,
        rescore: bool = True,
        oversampling: float = 2.0,
        on_disk: bool = False,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(dim)
        local = is_local_client(client)
        if use_shard_keys is None:
            use_shard_keys = not local
        if use_shard_keys and local:
            raise IndexBackendError("local-mode Qdrant has no custom sharding: use_shard_keys=False")
        if quantization not in (None, "int8", "binary"):
            raise IndexBackendError(f"quantization must be None, 'int8' or 'binary', got {quantization!r}")
        self.client = client
        self.collection = collection
        self.use_shard_keys = use_shard_keys
        self._local = local
        self._on_close = on_close
        self._shards_per_key = shards_per_key
        self._replication_factor = replication_factor
        self._search_params = qm.SearchParams(
            hnsw_ef=hnsw_ef,
            quantization=(
                qm.QuantizationSearchParams(rescore=rescore, oversampling=oversampling)
                if quantization
                else None
            ),
        )
        quant_config: qm.QuantizationConfig | None = None
        if quantization == "int8":
            quant_config = qm.ScalarQuantization(
                scalar=qm.ScalarQuantizationConfig(type=qm.ScalarType.INT8, quantile=0.99, always_ram=True)
            )
        elif quantization == "binary":
            quant_config = qm.BinaryQuantization(binary=qm.BinaryQuantizationConfig(always_ram=True))
        try:
            self._ensure_collection(
                qm.VectorParams(size=dim, distance=qm.Distance.COSINE, on_disk=on_disk),
                qm.HnswConfigDiff(m=hnsw_m, ef_construct=hnsw_ef_construct),
                quant_config,
                replication_factor,
                write_consistency_factor,
            )
            self._known: set[str] = self._load_shard_keys()
        except IndexBackendError:
            raise
        except Exception as exc:
            raise IndexBackendError(f"cannot open Qdrant collection {collection!r}: {exc}") from exc

    # ---- setup --------------------------------------------------------------------------------

    def _ensure_collection(
        self,
        vectors: qm.VectorParams,
        hnsw: qm.HnswConfigDiff,
        quant: qm.QuantizationConfig | None,
        replication_factor: int,
        write_consistency_factor: int,
    ) -> None:
        if not self.client.collection_exists(self.collection):
            try:
                self.client.create_collection(
                    self.collection,
                    vectors_config={VECTOR_NAME: vectors},
                    hnsw_config=hnsw,
                    quantization_config=quant,
                    sharding_method=qm.ShardingMethod.CUSTOM if self.use_shard_keys else None,
                    shard_number=self._shards_per_key if self.use_shard_keys else None,
                    replication_factor=replication_factor,
                    write_consistency_factor=write_consistency_factor,
                )
            except Exception:
                if not self.client.collection_exists(self.collection):  # lost a creation race?
                    raise
            if not self._local:  # local mode warns that payload indexes have no effect
                for field, schema in (
                    (ITEM_ID_KEY, qm.PayloadSchemaType.KEYWORD),
                    (DELETED_KEY, qm.PayloadSchemaType.BOOL),
                ):
                    self.client.create_payload_index(self.collection, field, schema)
                if not self.use_shard_keys:
                    self.client.create_payload_index(
                        self.collection,
                        SHARD_KEY,
                        qm.KeywordIndexParams(type=qm.KeywordIndexType.KEYWORD, is_tenant=True),
                    )
        params = self.client.get_collection(self.collection).config.params
        vec = params.vectors.get(VECTOR_NAME) if isinstance(params.vectors, dict) else None
        if vec is None:
            raise IndexBackendError(f"collection {self.collection!r} has no {VECTOR_NAME!r} vector")
        if vec.size != self.dim:
            raise IndexBackendError(
                f"collection {self.collection!r} holds {vec.size}-d vectors, opened with dim={self.dim}"
            )
        custom = params.sharding_method == qm.ShardingMethod.CUSTOM
        if self.use_shard_keys and not custom:
            raise IndexBackendError(f"collection {self.collection!r} was not created with custom sharding")

    def _load_shard_keys(self) -> set[str]:
        if self.use_shard_keys:
            resp = self.client.list_shard_keys(self.collection)
            return {str(d.key) for d in resp.shard_keys or []}
        facet = self.client.facet(self.collection, SHARD_KEY, limit=100_000, exact=True)
        return {str(h.value) for h in facet.hits}

    def _ensure_shard(self, key: str) -> None:
        if key in self._known:
            return
        if self.use_shard_keys:
            try:
                self.client.create_shard_key(
                    self.collection,
                    key,
                    shards_number=self._shards_per_key,
                    replication_factor=self._replication_factor,
                )
            except Exception:
                if key not in self._load_shard_keys():  # another writer may have created it
                    raise
        self._known.add(key)

    def _reading(self) -> contextlib.AbstractContextManager[Any]:
        # Local mode's in-process arrays are resized by writes and not safe to read meanwhile;
        # a server client is (reads there need no lock).
        return self._write_lock if self._local else contextlib.nullcontext()

    def _selector(self, shard: str | list[str] | None) -> Any:
        return shard if self.use_shard_keys else None

    # ---- primitives ---------------------------------------------------------------------------

    def _fetch(self, point_ids: list[str], *, with_vectors: bool) -> dict[str, list[StoredPoint]]:
        # With shard keys the same id may exist under several keys (mid-move): ask each key.
        keys: list[str | None] = sorted(self._known) if self.use_shard_keys else [None]
        out: dict[str, list[StoredPoint]] = {}
        for key in keys:
            with self._reading():
                records = self.client.retrieve(
                    self.collection,
                    point_ids,
                    with_payload=True,
                    with_vectors=[VECTOR_NAME] if with_vectors else False,
                    shard_key_selector=key,
                )
            for rec in records:
                payload = dict(rec.payload or {})
                vec = rec.vector.get(VECTOR_NAME) if with_vectors and isinstance(rec.vector, dict) else None
                shard = key if key is not None else payload.get(SHARD_KEY, TOMBSTONE_SHARD)
                out.setdefault(str(rec.id), []).append(
                    StoredPoint(shard, payload, None if vec is None else np.asarray(vec, np.float32))
                )
        return out

    def _put(self, shard: str, points: list[PutPoint]) -> None:
        self._ensure_shard(shard)
        structs = [
            qm.PointStruct(
                id=p.point_id,
                vector={VECTOR_NAME: p.vector} if p.vector is not None else {},
                payload=p.payload,
            )
            for p in points
        ]
        self.client.upsert(self.collection, structs, wait=True, shard_key_selector=self._selector(shard))

    def _drop(self, shard: str, point_ids: list[str]) -> None:
        if self.use_shard_keys:
            selector: qm.PointsSelector = qm.PointIdsList(points=list(point_ids))
        else:
            selector = qm.FilterSelector(
                filter=qm.Filter(
                    must=[
                        qm.HasIdCondition(has_id=list(point_ids)),
                        qm.FieldCondition(key=SHARD_KEY, match=qm.MatchValue(value=shard)),
                    ]
                )
            )
        self.client.delete(self.collection, selector, wait=True, shard_key_selector=self._selector(shard))

    def _live_filter(self, shards: list[str] | None, where: Where) -> qm.Filter:
        must: list[qm.Condition] = [qm.HasVectorCondition(has_vector=VECTOR_NAME), *_conditions(where)]
        if shards is not None and not self.use_shard_keys:
            must.append(qm.FieldCondition(key=SHARD_KEY, match=qm.MatchAny(any=list(shards))))
        return qm.Filter(
            must=must, must_not=[qm.FieldCondition(key=DELETED_KEY, match=qm.MatchValue(value=True))]
        )

    def _search(
        self, vector: list[float], limit: int, shards: list[str] | None, where: Where
    ) -> list[SearchHit]:
        return self._search_batch([vector], limit, shards, where)[0]

    def _search_batch(
        self, vectors: list[list[float]], limit: int, shards: list[str] | None, where: Where
    ) -> list[list[SearchHit]]:
        """All queries in one round trip (``query_batch_points``)."""
        flt = self._live_filter(shards, where)
        requests = [
            qm.QueryRequest(
                query=v, using=VECTOR_NAME, limit=limit, filter=flt, with_payload=True,
                params=None if self._local else self._search_params, shard_key=self._selector(shards),
            )
            for v in vectors
        ]
        with self._reading():
            responses = self.client.query_batch_points(self.collection, requests=requests)
        out = []
        for resp in responses:
            hits = []
            for sp in resp.points:
                payload = dict(sp.payload or {})
                hits.append(SearchHit(payload[ITEM_ID_KEY], payload.get(SHARD_KEY, ""), float(sp.score), payload))
            out.append(hits)
        return out

    def _count(self, shard: str | None) -> int:
        shards = [shard] if shard is not None else None
        with self._reading():
            return self.client.count(
                self.collection,
                count_filter=self._live_filter(shards, {}),
                exact=True,
                shard_key_selector=self._selector(shard),
            ).count

    def _scroll(
        self, shard: str, offset: Any, limit: int, *, with_vectors: bool
    ) -> tuple[list[tuple[str, StoredPoint]], Any]:
        with self._reading():
            records, next_offset = self.client.scroll(
                self.collection,
                scroll_filter=self._live_filter([shard], {}),
                limit=limit,
                offset=offset,
                with_payload=True,
                with_vectors=[VECTOR_NAME] if with_vectors else False,
                shard_key_selector=self._selector(shard),
            )
        page = []
        for rec in records:
            vec = rec.vector.get(VECTOR_NAME) if with_vectors and isinstance(rec.vector, dict) else None
            page.append(
                (str(rec.id), StoredPoint(shard, dict(rec.payload or {}),
                                          None if vec is None else np.asarray(vec, np.float32)))
            )
        return page, next_offset

    # ---- VectorIndex --------------------------------------------------------------------------

    def shards(self) -> list[str]:
        return sorted(k for k in self._known if k != TOMBSTONE_SHARD)

    def close(self) -> None:
        with self._write_lock:
            if self._closed:
                return
            self._closed = True
            if self._on_close is not None:
                self._on_close()

    # ---- aliases (blue/green model switches) --------------------------------------------------

    def point_alias(self, alias: str) -> None:
        """Make ``alias`` name this collection, atomically replacing whatever it named before."""
        ops: list[qm.AliasOperations] = []
        if any(a.alias_name == alias for a in self.client.get_aliases().aliases):
            ops.append(qm.DeleteAliasOperation(delete_alias=qm.DeleteAlias(alias_name=alias)))
        ops.append(
            qm.CreateAliasOperation(
                create_alias=qm.CreateAlias(collection_name=self.collection, alias_name=alias)
            )
        )
        self.client.update_collection_aliases(ops)

    def aliases(self) -> list[str]:
        """Aliases that currently name this collection."""
        return sorted(a.alias_name for a in self.client.get_collection_aliases(self.collection).aliases)
