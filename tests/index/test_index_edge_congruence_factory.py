"""Edge specifics (persistence, immediate searchability around HNSW builds, int8 rescoring), the
Edge-vs-Qdrant congruence check, and ``open_index``."""

from __future__ import annotations

import json

import numpy as np
import pytest
from qdrant_client import QdrantClient

from index.base import IndexBackendError, IndexPoint
from index.edge import EdgeIndex, shard_dir_name
from index.factory import model_slug, open_index
from index.qdrant import QdrantIndex
from index.settings import EdgeIndexSettings, QdrantIndexSettings


def unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def pts(vecs: np.ndarray, shards: list[str], version: int = 1) -> list[IndexPoint]:
    return [
        IndexPoint(f"i{k}", shards[k % len(shards)], v, {"color": ["red", "blue"][k % 2]}, version)
        for k, v in enumerate(vecs)
    ]


def test_edge_reopen_after_close(tmp_path) -> None:
    rng = np.random.default_rng(1)
    vecs = unit(rng, 20, 8)
    with EdgeIndex(tmp_path, 8, model_id="m1") as ix:
        ix.upsert(pts(vecs, ["女装/上衣", "shoes"]))
        ix.delete(["i0", "ghost"], 5)
    ix = EdgeIndex(tmp_path, 8, model_id="m1")
    assert ix.shards() == ["shoes", "女装/上衣"] and ix.count() == 19
    assert ix.stored_versions(["i0", "ghost", "i1"]) == {"i0": 5, "ghost": 5, "i1": 1}
    assert ix.search(vecs[3], limit=1)[0].item_id == "i3"
    assert ix.upsert(pts(vecs[:1], ["shoes"], version=4)).stale == ["i0"]  # tombstone persisted
    ix.close()
    with pytest.raises(IndexBackendError, match="model"):
        EdgeIndex(tmp_path, 8, model_id="m2")
    with pytest.raises(IndexBackendError, match="8-d"):
        EdgeIndex(tmp_path, 16, model_id="m1")


def test_edge_layout_is_filesystem_safe(tmp_path) -> None:
    rng = np.random.default_rng(2)
    keys = ["../etc", "A/B", "a/b", "女装"]
    with EdgeIndex(tmp_path, 4) as ix:
        ix.upsert(
            [
                IndexPoint(f"x{k}", key, v)
                for k, (key, v) in enumerate(zip(keys, unit(rng, 4, 4), strict=True))
            ]
        )
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert sorted(manifest["shards"].values()) == sorted(keys)
    dirs = sorted(p.name for p in (tmp_path / "shards").iterdir())
    assert dirs == sorted(shard_dir_name(k) for k in keys)
    assert len({d.lower() for d in dirs}) == 4 and all("/" not in d and ".." not in d for d in dirs)


def test_edge_new_points_searchable_before_and_after_hnsw_build(tmp_path) -> None:
    """Edge has no background optimizer: HNSW exists only after optimize(); points written before
    and after it must be searchable immediately either way."""
    rng = np.random.default_rng(3)
    dim = 32
    vecs = unit(rng, 2100, dim)
    ix = EdgeIndex(tmp_path, dim, indexing_threshold_kb=1, full_scan_threshold_kb=1, hnsw_ef=64)
    ix.upsert(pts(vecs[:2000], ["a", "b"]))
    assert ix.indexed_vectors_count() == 0
    assert ix.search(vecs[1999], limit=1)[0].item_id == "i1999"
    ix.optimize()
    assert ix.indexed_vectors_count() >= 1900  # the graph is really built (and used below)
    fresh = [IndexPoint(f"n{k}", "a", vecs[2000 + k]) for k in range(100)]
    ix.upsert(fresh)
    for k in (0, 57, 99):
        assert ix.search(vecs[2000 + k], limit=1)[0].item_id == f"n{k}"
    truth = np.argsort(-(vecs[:50] @ vecs[:2100].T), axis=1)[:, :10]
    names = [f"i{k}" for k in range(2000)] + [f"n{k}" for k in range(100)]
    found = sum(
        len({h.item_id for h in ix.search(vecs[q], limit=10)} & {names[t] for t in truth[q]})
        for q in range(50)
    )
    assert found / 500 >= 0.95
    ix.close()


def test_edge_int8_quantization_with_rescoring(tmp_path) -> None:
    rng = np.random.default_rng(4)
    dim = 64
    vecs = unit(rng, 1500, dim)
    ix = EdgeIndex(tmp_path, dim, quantization="int8", indexing_threshold_kb=1, full_scan_threshold_kb=1)
    ix.upsert(pts(vecs, ["a"]))
    ix.optimize()
    hits = ix.search(vecs[10], limit=10)
    assert hits[0].item_id == "i10" and hits[0].score == pytest.approx(1.0, abs=1e-4)  # rescored: exact
    ix.close()
    with pytest.raises(IndexBackendError):
        EdgeIndex(tmp_path / "x", dim, quantization="pq")  # type: ignore[arg-type]


def test_congruence_edge_vs_qdrant_local(tmp_path) -> None:
    rng = np.random.default_rng(5)
    dim = 24
    vecs = unit(rng, 400, dim)
    client = QdrantClient(":memory:")
    edge = EdgeIndex(tmp_path, dim)
    qdr = QdrantIndex(client, "congruence", dim)
    for ix in (edge, qdr):
        ix.upsert(pts(vecs, ["s1", "s2", "s3"]))
        ix.delete([f"i{k}" for k in range(0, 400, 7)], 2)
        ix.upsert(pts(vecs[:40], ["s3"], version=3))  # moves (and revives some tombstoned ones)
        ix.upsert(pts(vecs[:10], ["s1"], version=2))  # stale
    assert edge.count() == qdr.count() and edge.shards() == qdr.shards()
    for s in edge.shards():
        assert edge.count(s) == qdr.count(s)
    for q in unit(rng, 20, dim):
        for kwargs in ({}, {"shards": ["s3"]}, {"shards": ["s1", "s2"], "where": {"color": "red"}}):
            a = edge.search(q, limit=10, **kwargs)
            b = qdr.search(q, limit=10, **kwargs)
            assert [h.item_id for h in a] == [h.item_id for h in b]
            np.testing.assert_allclose([h.score for h in a], [h.score for h in b], atol=1e-5)
            assert [h.shard for h in a] == [h.shard for h in b]
    ids = [f"i{k}" for k in range(60)]
    assert edge.stored_versions(ids) == qdr.stored_versions(ids)
    assert [r.payload for r in edge.retrieve(ids)] == [r.payload for r in qdr.retrieve(ids)]
    edge.close()
    qdr.close()
    client.close()


def test_open_index_edge_keeps_models_apart(tmp_path) -> None:
    settings = EdgeIndexSettings(dir=tmp_path / "index")
    v = unit(np.random.default_rng(6), 1, 8)[0]
    with open_index(settings, 8, model_id="effnet-lite0@v1") as ix:
        ix.upsert([IndexPoint("a", "shoes", v)])
    with open_index(settings, 16, model_id="effnet-lite0@v2") as ix:  # new generation, new dim
        assert ix.count() == 0
    with open_index(settings, 8, model_id="effnet-lite0@v1") as ix:
        assert ix.count() == 1
    with pytest.raises(IndexBackendError, match="8-d"):
        open_index(settings, 12, model_id="effnet-lite0@v1")
    assert model_slug("a/b") != model_slug("a:b")
    assert sorted(p.name for p in settings.dir.iterdir()) == sorted(
        f"model-{model_slug(m)}" for m in ("effnet-lite0@v1", "effnet-lite0@v2")
    )
    with pytest.raises(IndexBackendError):
        open_index(settings, 8, model_id="")


def test_open_index_qdrant(tmp_path) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="url"):
        QdrantIndexSettings()
    settings = QdrantIndexSettings(url=":memory:")
    ix = open_index(settings, 8, model_id="m")
    assert isinstance(ix.shared, QdrantIndex) and not ix.use_shard_keys
    assert ix.collection == f"tongkuan__{model_slug('m')}"
    ix.point_alias("tongkuan")
    assert ix.aliases() == ["tongkuan"]
    ix.point_alias("tongkuan")  # re-pointing is idempotent
    assert ix.aliases() == ["tongkuan"]
    with open_index(settings, 8, model_id="m") as again:  # one shared index per process
        assert again.shared is ix.shared
    with pytest.raises(IndexBackendError):
        QdrantIndex(ix.client, ix.collection, 9)
    with pytest.raises(IndexBackendError):
        QdrantIndex(ix.client, "other", 8, use_shard_keys=True)
    ix.close()
