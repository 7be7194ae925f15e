"""``ShardedLocalClient``: a Qdrant server's custom sharding (shard keys), emulated over
``QdrantClient(":memory:")`` so that ``QdrantIndex``'s server path (``use_shard_keys=True``) runs in
the shared tests; no server can run here.

Each shard key is one local collection, so point ids are unique per shard key only, as on a server.
A read without ``shard_key_selector`` covers every shard key (as a server's does); a write, scroll
or delete must name exactly one, and an unknown shard key is an error. Only the calls and arguments
``QdrantIndex`` uses are emulated; calls are serialised (local mode is not safe to read while
writing, a server is).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from qdrant_client import QdrantClient
from qdrant_client import models as qm


@dataclass
class _Collection:
    vectors: dict[str, qm.VectorParams]
    keys: dict[str, str] = field(default_factory=dict)  # shard key -> local collection
    schema: dict[str, Any] = field(default_factory=dict)


class ShardedLocalClient:
    def __init__(self) -> None:
        self.local = QdrantClient(":memory:")
        self._collections: dict[str, _Collection] = {}
        self._lock = threading.RLock()

    # ---- collections and shard keys -----------------------------------------------------------

    def collection_exists(self, name: str) -> bool:
        return name in self._collections

    def create_collection(self, name: str, *, vectors_config: dict[str, qm.VectorParams],
                          sharding_method: qm.ShardingMethod | None = None, **_: Any) -> None:
        if sharding_method != qm.ShardingMethod.CUSTOM:
            raise NotImplementedError("ShardedLocalClient emulates custom sharding only")
        if name in self._collections:
            raise ValueError(f"collection {name} already exists")
        self._collections[name] = _Collection(dict(vectors_config))

    def get_collection(self, name: str) -> Any:
        c = self._collections[name]
        params = SimpleNamespace(vectors=c.vectors, sharding_method=qm.ShardingMethod.CUSTOM)
        return SimpleNamespace(config=SimpleNamespace(params=params), payload_schema=dict(c.schema))

    def create_payload_index(self, name: str, field_name: str, schema: Any) -> None:
        self._collections[name].schema[field_name] = schema

    def list_shard_keys(self, name: str) -> Any:
        return SimpleNamespace(shard_keys=[SimpleNamespace(key=k) for k in self._collections[name].keys])

    def create_shard_key(self, name: str, shard_key: str, **_: Any) -> bool:
        with self._lock:
            c = self._collections[name]
            if shard_key in c.keys:
                raise ValueError(f"shard key {shard_key!r} already exists")
            local = f"{name}#{len(c.keys)}"
            self.local.create_collection(local, vectors_config=c.vectors)
            c.keys[shard_key] = local
            return True

    def _targets(self, name: str, selector: str | list[str] | None, *, one: bool = False) -> list[str]:
        keys = self._collections[name].keys
        if selector is None:
            if one:
                raise ValueError("a write, scroll or delete in a custom-sharded collection names a shard key")
            return list(keys.values())
        wanted = [selector] if isinstance(selector, str) else list(selector)
        if one and len(wanted) != 1:
            raise NotImplementedError("ShardedLocalClient: one shard key here")
        missing = [k for k in wanted if k not in keys]
        if missing:
            raise ValueError(f"shard keys {missing} do not exist")
        return [keys[k] for k in wanted]

    # ---- points -------------------------------------------------------------------------------

    def upsert(self, name: str, points: list[qm.PointStruct], *, shard_key_selector: Any = None,
               **kw: Any) -> None:
        with self._lock:
            (local,) = self._targets(name, shard_key_selector, one=True)
            self.local.upsert(local, points, **kw)

    def delete(self, name: str, points_selector: Any, *, shard_key_selector: Any = None, **kw: Any) -> None:
        with self._lock:
            (local,) = self._targets(name, shard_key_selector, one=True)
            self.local.delete(local, points_selector, **kw)

    def retrieve(self, name: str, ids: list[str], *, shard_key_selector: Any = None, **kw: Any) -> list[Any]:
        with self._lock:
            return [r for local in self._targets(name, shard_key_selector) for r in self.local.retrieve(local, ids, **kw)]

    def scroll(self, name: str, *, shard_key_selector: Any = None, **kw: Any) -> tuple[list[Any], Any]:
        with self._lock:
            (local,) = self._targets(name, shard_key_selector, one=True)
            return self.local.scroll(local, **kw)

    def count(self, name: str, *, shard_key_selector: Any = None, **kw: Any) -> Any:
        with self._lock:
            total = sum(self.local.count(local, **kw).count for local in self._targets(name, shard_key_selector))
            return SimpleNamespace(count=total)

    def facet(self, name: str, key: str, *, shard_key_selector: Any = None, limit: int = 10, **kw: Any) -> Any:
        with self._lock:
            counts: dict[Any, int] = {}
            for local in self._targets(name, shard_key_selector):
                for hit in self.local.facet(local, key, limit=limit, **kw).hits:
                    counts[hit.value] = counts.get(hit.value, 0) + hit.count
            hits = sorted(counts.items(), key=lambda kv: -kv[1])[:limit]
            return SimpleNamespace(hits=[SimpleNamespace(value=v, count=c) for v, c in hits])

    def query_batch_points(self, name: str, *, requests: list[qm.QueryRequest]) -> list[Any]:
        """Scatter-gather per request over its shard keys (None = all), merged by score."""
        with self._lock:
            out = []
            for req in requests:
                found = []
                for local in self._targets(name, req.shard_key):
                    found += self.local.query_points(
                        local, query=req.query, using=req.using, limit=req.limit, query_filter=req.filter,
                        with_payload=req.with_payload,
                    ).points
                out.append(SimpleNamespace(points=sorted(found, key=lambda p: -p.score)[: req.limit]))
            return out

    def close(self) -> None:
        self.local.close()
