"""``QdrantIndex``: the cluster implementation, on ``qdrant_client.QdrantClient``.

Two placements of shard keys, chosen by ``use_shard_keys`` (default: auto-detected):

* ``True`` (a Qdrant server): the collection uses ``sharding_method=custom``; the first
  ``max_shards - 1`` top-level categories get a Qdrant shard key each (named as the category),
  created on demand, and later ones share the shard key ``__overflow__``, told apart there by the
  ``shard`` payload field (``index.placement``). Writes, retrieves and searches name their shard
  keys, and a search over several categories is a server-side scatter-gather. Point ids are only
  unique within a shard key, so a move to another shard key drops the old key's copy explicitly.
  The server holds the placement: a category is dedicated iff a shard key of its name exists, and
  shared iff a point of the overflow key carries it (a facet, so an overflow category whose last
  point moved away is forgotten and placed afresh on its next write). A category this process has
  not seen is placed after re-reading both, so writers agree; two writers placing *different* new
  categories at the same moment can still overshoot the cap by one shard key each.
* ``False`` (``QdrantClient(":memory:")`` / local path mode, which has no custom sharding): one
  plain collection, i.e. one physical shard shared by every category (``max_shards`` has no
  effect), with the key in the ``shard`` payload field and a filter on it.

In a shared shard point ids are unique across its categories, so a move between two of them is an
overwrite; ``_drop`` is filtered by ``shard`` there so it can never delete the copy just written.

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


def is_local_client(client: QdrantClient) -> bool:
    """True for the in-process mode (``":memory:"`` or ``path=``), which has no custom sharding."""
    from qdrant_client.local.qdrant_local import QdrantLocal

    return isinstance(getattr(client, "_client", None), QdrantLocal)


def _conditions(where: Where, keys: list[str] | None = None) -> list[qm.Condition]:
    """``where`` as Qdrant conditions, plus ``shard`` in ``keys`` (None = no such filter)."""
    out: list[qm.Condition] = []
    for key, value in where.items():
        if isinstance(value, Range):
            out.append(qm.FieldCondition(key=key, range=qm.Range(gte=value.gte, lte=value.lte)))
            continue
        match = qm.MatchAny(any=value) if isinstance(value, list) else qm.MatchValue(value=value)
        out.append(qm.FieldCondition(key=key, match=match))
    if keys is not None:
        out.append(qm.FieldCondition(key=SHARD_KEY, match=qm.MatchAny(any=list(keys))))
    return out


class QdrantIndex(GuardedIndex):
    """A Qdrant collection, one shard key (or ``shard`` payload value) per category; cosine.

    ``replication_factor``/``write_consistency_factor`` apply to a new collection (and to each new
    shard key); ``shards_per_key`` is the Qdrant shard count per shard key. ``max_shards``: most
    shard keys (None: no cap; see the module doc). ``quantization``: ``"int8"`` (scalar) or
    ``"binary"`` (1 bit, 8-bit queries), configured and searched as ``index.edge.edge_config``/
    ``search_params`` do (``oversampling`` None: ``DEFAULT_OVERSAMPLING``).
    ``on_close``: called once when the index closes (the factory releases its shared client).
    """

    def __init__(
        self,
        client: QdrantClient,
        collection: str,
        dim: int,
        *,
        text_dim: int = 0,
        use_shard_keys: bool | None = None,
        shards_per_key: int = 1,
        replication_factor: int = 1,
        write_consistency_factor: int = 1,
        hnsw_m: int = 16,
        hnsw_ef_construct: int = 100,
        hnsw_ef: int = 128,
        quantization: Literal["int8", "binary"] | None = None,
        rescore: bool = True,
        oversampling: float | None = None,
        on_disk: bool = False,
        on_close: Callable[[], None] | None = None,
        max_shards: int | None = DEFAULT_MAX_SHARDS,
    ) -> None:
        super().__init__(dim, text_dim)
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
        try:
            ShardPlacement(max_shards)  # refuse a bad value even where it has no effect
        except ValueError as exc:
            raise IndexBackendError(str(exc)) from exc
        self._max_shards = max_shards if use_shard_keys else 1  # local mode: one shared collection
        self._search_params = qm.SearchParams(
            hnsw_ef=hnsw_ef,
            quantization=(
                qm.QuantizationSearchParams(
                    rescore=rescore, oversampling=oversampling or DEFAULT_OVERSAMPLING[quantization]
                )
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
            quant_config = qm.BinaryQuantization(binary=qm.BinaryQuantizationConfig(  # as index.edge
                always_ram=True, encoding=qm.BinaryQuantizationEncoding.ONE_BIT,
                query_encoding=qm.BinaryQuantizationQueryEncoding.SCALAR8BITS,
            ))
        try:
            self._ensure_collection(
                qm.VectorParams(size=dim, distance=qm.Distance.COSINE, on_disk=on_disk),
                qm.HnswConfigDiff(m=hnsw_m, ef_construct=hnsw_ef_construct),
                quant_config,
                replication_factor,
                write_consistency_factor,
            )
            self._placement = self._load_placement()
        except IndexBackendError:
            raise
        except Exception as exc:
            raise IndexBackendError(f"cannot open Qdrant collection {collection!r}: {exc}") from exc

    # ---- setup --------------------------------------------------------------------------------

    def _vectors_config(self, image: qm.VectorParams) -> dict[str, qm.VectorParams]:
        config = {VECTOR_NAME: image}
        if self.text_dim:  # same storage options as the image vector, its own size
            config[TITLE_VECTOR] = image.model_copy(update={"size": self.text_dim})
        return config

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
                    vectors_config=self._vectors_config(vectors),
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
        info = self.client.get_collection(self.collection)
        if not self._local and SHARD_KEY not in (info.payload_schema or {}):
            # The shard filter of shared shards, and the facet that lists their categories, need
            # it; collections from before the cap had it only without custom sharding.
            self.client.create_payload_index(
                self.collection,
                SHARD_KEY,
                qm.KeywordIndexParams(type=qm.KeywordIndexType.KEYWORD, is_tenant=True),
            )
        params = info.config.params
        vec = params.vectors.get(VECTOR_NAME) if isinstance(params.vectors, dict) else None
        if vec is None:
            raise IndexBackendError(f"collection {self.collection!r} has no {VECTOR_NAME!r} vector")
        if vec.size != self.dim:
            raise IndexBackendError(
                f"collection {self.collection!r} holds {vec.size}-d vectors, opened with dim={self.dim}"
            )
        title = params.vectors.get(TITLE_VECTOR)
        if (title.size if title is not None else 0) != self.text_dim:
            raise IndexBackendError(
                f"collection {self.collection!r} holds {title.size if title is not None else 0}-d title vectors "
                f"(0: none), opened with text_dim={self.text_dim}: re-embed into a new generation"
            )
        custom = params.sharding_method == qm.ShardingMethod.CUSTOM
        if self.use_shard_keys and not custom:
            raise IndexBackendError(f"collection {self.collection!r} was not created with custom sharding")

    def _shard_keys(self) -> list[str]:
        return [str(d.key) for d in self.client.list_shard_keys(self.collection).shard_keys or []]

    def _load_placement(self) -> ShardPlacement:
        if not self.use_shard_keys:
            return ShardPlacement(self._max_shards, shared=self._facet(None))
        keys = self._shard_keys()
        shared = self._facet(OVERFLOW_SHARD) if OVERFLOW_SHARD in keys else []
        return ShardPlacement(self._max_shards, [k for k in keys if k != OVERFLOW_SHARD], shared)

    def _facet(self, shard_key: str | None) -> list[str]:
        """The ``shard`` payload values in ``shard_key`` (None: the whole collection)."""
        with self._reading():
            facet = self.client.facet(
                self.collection, SHARD_KEY, limit=100_000, exact=True, shard_key_selector=shard_key
            )
        return [str(h.value) for h in facet.hits]

    def _place(self, key: str) -> str:
        """The physical shard of logical ``key``, placing it (and creating its shard key) if new.
        Called under the write lock."""
        physical = self._placement.physical(key)
        if physical is not None:
            return physical
        if self.use_shard_keys:
            self._placement = self._load_placement()  # another writer may have placed it, or filled the cap
            physical = self._placement.target(key)
            if physical not in self._placement.physicals():
                try:
                    self.client.create_shard_key(
                        self.collection,
                        physical,
                        shards_number=self._shards_per_key,
                        replication_factor=self._replication_factor,
                    )
                except Exception:
                    if physical not in self._shard_keys():  # another writer may have created it
                        raise
        return self._placement.place(key)

    def _reading(self) -> contextlib.AbstractContextManager[Any]:
        # Local mode's in-process arrays are resized by writes and not safe to read meanwhile;
        # a server client is (reads there need no lock).
        return self._write_lock if self._local else contextlib.nullcontext()

    def _selector(self, physical: str | list[str] | None) -> Any:
        return physical if self.use_shard_keys else None

    def _shared_filter(self, shard: str) -> tuple[str | None, list[str] | None]:
        """(physical shard of logical ``shard``, the ``shard`` values to filter on there or None)."""
        physical = self._placement.physical(shard)
        return physical, None if physical == shard else [shard]

    # ---- primitives ---------------------------------------------------------------------------

    def _fetch(self, point_ids: list[str], *, with_vectors: bool) -> dict[str, list[StoredPoint]]:
        # With shard keys the same id may exist under several keys (mid-move): ask each key.
        keys: list[str | None] = list(self._placement.physicals()) if self.use_shard_keys else [None]
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
                shard = key if key not in (None, OVERFLOW_SHARD) else payload.get(SHARD_KEY, TOMBSTONE_SHARD)
                out.setdefault(str(rec.id), []).append(
                    StoredPoint(shard, payload, None if vec is None else np.asarray(vec, np.float32))
                )
        return out

    def _put(self, shard: str, points: list[PutPoint]) -> None:
        physical = self._place(shard)
        structs = [
            qm.PointStruct(
                id=p.point_id,
                vector=({} if p.vector is None else {VECTOR_NAME: p.vector} if p.title is None
                        else {VECTOR_NAME: p.vector, TITLE_VECTOR: p.title}),
                payload=p.payload,
            )
            for p in points
        ]
        self.client.upsert(self.collection, structs, wait=True, shard_key_selector=self._selector(physical))

    def _drop(self, shard: str, point_ids: list[str]) -> None:
        physical, keys = self._shared_filter(shard)
        if physical is None:
            return
        if keys is None:
            selector: qm.PointsSelector = qm.PointIdsList(points=list(point_ids))
        else:
            selector = qm.FilterSelector(
                filter=qm.Filter(must=[qm.HasIdCondition(has_id=list(point_ids)), *_conditions({}, keys)])
            )
        self.client.delete(self.collection, selector, wait=True, shard_key_selector=self._selector(physical))

    @staticmethod
    def _live_filter(keys: list[str] | None, where: Where) -> qm.Filter:
        must: list[qm.Condition] = [qm.HasVectorCondition(has_vector=VECTOR_NAME), *_conditions(where, keys)]
        return qm.Filter(
            must=must, must_not=[qm.FieldCondition(key=DELETED_KEY, match=qm.MatchValue(value=True))]
        )

    def _search(
        self, vector: list[float], limit: int, shards: list[str] | None, where: Where, using: str
    ) -> list[SearchHit]:
        return self._search_batch([vector], limit, shards, where, using)[0]

    def _search_batch(
        self, vectors: list[list[float]], limit: int, shards: list[str] | None, where: Where, using: str
    ) -> list[list[SearchHit]]:
        """All queries in one round trip (``query_batch_points``)."""
        selector: list[str] | None = None
        keys: list[str] | None = None
        if shards is not None:
            plan = self._placement.plan(shards)
            if not plan:
                return [[] for _ in vectors]
            selector = sorted(plan)
            # Dedicated shards' points carry their key too, so one filter serves every shard key.
            keys = shards if any(v is not None for v in plan.values()) else None
        flt = self._live_filter(keys, where)
        requests = [
            qm.QueryRequest(
                query=v, using=using, limit=limit, filter=flt, with_payload=True,
                params=None if self._local else self._search_params, shard_key=self._selector(selector),
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
        physical, keys = (None, None) if shard is None else self._shared_filter(shard)
        with self._reading():
            return self.client.count(
                self.collection,
                count_filter=self._live_filter(keys, {}),
                exact=True,
                shard_key_selector=self._selector(physical),
            ).count

    def _scroll(
        self, shard: str, offset: Any, limit: int, *, with_vectors: bool
    ) -> tuple[list[tuple[str, StoredPoint]], Any]:
        physical, keys = self._shared_filter(shard)
        with self._reading():
            records, next_offset = self.client.scroll(
                self.collection,
                scroll_filter=self._live_filter(keys, {}),
                limit=limit,
                offset=offset,
                with_payload=True,
                with_vectors=[VECTOR_NAME] if with_vectors else False,
                shard_key_selector=self._selector(physical),
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
        return [k for k in self._placement.keys() if k != TOMBSTONE_SHARD]

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
