"""``OwnerAndReader``: an index whose writes go to the owner (an ``EdgeIndex``) and whose reads go
through ``RemoteIndex`` over a live ``IndexReadService`` — so the contract tests run every read
through the wire protocol, against data written by the owner, as the API and the worker do."""

from __future__ import annotations

from index.base import VectorIndex
from index.remote import IndexReadService, RemoteIndex


class OwnerAndReader(VectorIndex):
    def __init__(self, owner: VectorIndex, model_id: str = "test-model"):
        self.owner = owner
        self.dim, self.text_dim = owner.dim, owner.text_dim
        self.service = IndexReadService(lambda m: owner if m == model_id else _unknown(m)).start()
        self.reader = RemoteIndex(self.service.address, model_id, owner.dim)

    # writes: the owner
    def upsert(self, points):
        return self.owner.upsert(points)

    def delete(self, item_ids, version=None):
        return self.owner.delete(item_ids, version)

    def flush(self):
        self.owner.flush()

    def optimize(self):
        self.owner.optimize()

    def scan(self, **kw):  # the owner pages through its own index (a reader does not scan)
        return self.owner.scan(**kw)

    # reads: over the wire
    def retrieve(self, item_ids, *, with_vectors=False):
        return self.reader.retrieve(item_ids, with_vectors=with_vectors)

    def stored_versions(self, item_ids):
        return self.reader.stored_versions(item_ids)

    def search(self, vector, *, limit=10, shards=None, where=None, using="image"):
        return self.reader.search(vector, limit=limit, shards=shards, where=where, using=using)

    def search_batch(self, vectors, *, limit=10, shards=None, where=None, using="image"):
        return self.reader.search_batch(vectors, limit=limit, shards=shards, where=where, using=using)

    def count(self, shard=None):
        return self.reader.count(shard)

    def shards(self):
        return self.reader.shards()

    def __getattr__(self, name):  # backend extras (indexed_vectors_count, ...)
        return getattr(self.owner, name)

    def close(self):
        self.reader.close()
        self.service.close()
        self.owner.close()


def _unknown(model_id: str):
    from index.remote import UnknownGeneration

    raise UnknownGeneration(f"no generation for model {model_id!r}")
