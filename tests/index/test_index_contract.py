"""The ``VectorIndex`` contract (index/base.py), run over every implementation via ``make_index``."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from index.base import TOMBSTONE_SHARD, IndexBackendError, IndexPoint, Range, point_id_for

DIM = 16  # make_index's default (tests/index/conftest.py)


def unit(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def pt(item_id: str, shard: str, vec: np.ndarray, version: int = 1, **payload) -> IndexPoint:
    return IndexPoint(item_id, shard, vec, payload, version)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(7)


def test_point_ids_are_uuid5_of_item_id() -> None:
    assert point_id_for("sku-1") == point_id_for("sku-1") != point_id_for("sku-2")


def test_empty_index(make_index, rng) -> None:
    ix = make_index()
    assert ix.search(unit(rng, 1)[0]) == []
    assert ix.count() == 0 and ix.count("shoes") == 0
    assert ix.shards() == []
    assert ix.retrieve(["nope"]) == [] and ix.stored_versions(["nope"]) == {}


def test_upsert_retrieve_search_count_delete(make_index, rng) -> None:
    ix = make_index()
    v = unit(rng, 3)
    res = ix.upsert([pt("a", "shoes", v[0], title="A"), pt("b", "shoes", v[1]), pt("c", "bags", v[2])])
    assert res.applied == ["a", "b", "c"] and res.stale == []
    assert ix.count() == 3 and ix.count("shoes") == 2 and ix.count("bags") == 1
    assert ix.shards() == ["bags", "shoes"]

    recs = ix.retrieve(["c", "missing", "a"], with_vectors=True)
    assert [r.item_id for r in recs] == ["c", "a"]
    assert recs[1].shard == "shoes" and recs[1].version == 1 and recs[1].payload["title"] == "A"
    assert recs[1].payload["item_id"] == "a"
    np.testing.assert_allclose(recs[1].vector, v[0], atol=1e-6)
    assert ix.retrieve(["a"])[0].vector is None

    hits = ix.search(v[0], limit=3)
    assert hits[0].item_id == "a" and hits[0].shard == "shoes"
    assert hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)

    assert ix.delete(["a"], 2).applied == ["a"]
    assert ix.count() == 2 and ix.count("shoes") == 1
    assert ix.retrieve(["a"]) == []
    assert "a" not in [h.item_id for h in ix.search(v[0], limit=10)]
    assert ix.stored_versions(["a", "b"]) == {"a": 2, "b": 1}


def test_shard_selection_and_scatter_gather(make_index, rng) -> None:
    ix = make_index()
    vecs = unit(rng, 30)
    shards = ["shoes", "bags", "hats"]
    ix.upsert([pt(f"i{k}", shards[k % 3], vecs[k]) for k in range(30)])
    q = vecs[4]  # lives in "bags"
    all_hits = ix.search(q, limit=30)
    assert len(all_hits) == 30 and {h.shard for h in all_hits} == set(shards)
    sims = vecs @ q
    assert [h.item_id for h in all_hits[:5]] == [f"i{k}" for k in np.argsort(-sims)[:5]]

    only_shoes = ix.search(q, limit=30, shards=["shoes"])
    assert len(only_shoes) == 10 and {h.shard for h in only_shoes} == {"shoes"}
    two = ix.search(q, limit=5, shards=["shoes", "hats"])
    expected = [f"i{k}" for k in np.argsort(-sims) if k % 3 != 1][:5]
    assert [h.item_id for h in two] == expected
    assert ix.search(q, shards=["unknown"]) == []
    assert ix.search(q, shards=[]) == []
    assert ix.search(q, limit=0) == []


def test_search_batch_equals_one_search_per_vector(make_index, rng) -> None:
    ix = make_index()
    vecs = unit(rng, 30)
    shards = ["shoes", "bags", "hats"]
    ix.upsert([pt(f"i{k}", shards[k % 3], vecs[k], color="red" if k % 2 else "blue") for k in range(30)])
    ix.delete(["i7"], 2)  # a tombstone never comes back from either path
    queries = vecs[[0, 7, 11, 29]]
    for kw in ({"limit": 5}, {"limit": 8, "shards": ["bags", "hats"]}, {"limit": 30, "where": {"color": "red"}}):
        batched = ix.search_batch(queries, **kw)
        single = [ix.search(q, **kw) for q in queries]
        assert [[(h.item_id, h.shard) for h in hits] for hits in batched] == \
            [[(h.item_id, h.shard) for h in hits] for hits in single], kw
        for b, s in zip(batched, single, strict=True):
            assert [h.score for h in b] == pytest.approx([h.score for h in s], abs=1e-5)
        assert all("i7" not in [h.item_id for h in hits] for hits in batched)
    assert ix.search_batch(queries, shards=["unknown"]) == [[], [], [], []]
    assert ix.search_batch(queries, limit=0) == [[], [], [], []]
    assert ix.search_batch(queries[:0]) == []


def test_where_filters(make_index, rng) -> None:
    ix = make_index()
    vecs = unit(rng, 12)
    colors = ["red", "blue", "green"]
    ix.upsert([pt(f"i{k}", "shoes", vecs[k], color=colors[k % 3], size=k % 4) for k in range(12)])
    q = vecs[0]
    red = ix.search(q, limit=12, where={"color": "red"})
    assert {h.item_id for h in red} == {f"i{k}" for k in range(12) if k % 3 == 0}
    any_of = ix.search(q, limit=12, where={"color": ["red", "blue"]})
    assert {h.item_id for h in any_of} == {f"i{k}" for k in range(12) if k % 3 != 2}
    both = ix.search(q, limit=12, where={"color": "red", "size": [0, 1]})
    assert {h.item_id for h in both} == {f"i{k}" for k in range(12) if k % 3 == 0 and k % 4 in (0, 1)}
    assert ix.search(q, where={"color": "purple"}) == []
    # bool/float/empty lists are refused rather than silently matching nothing (see index/base.py).
    for bad in ({"in_stock": True}, {"price": 1.5}, {"color": []}, {"color": ["red", 1]}, {"price": Range()},
                {"price": Range(gte="1")}, {"price": Range(lte=float("nan"))}):
        with pytest.raises(IndexBackendError):
            ix.search(q, where=bad)


def test_range_filters(make_index, rng) -> None:
    ix = make_index()
    vecs = unit(rng, 10)
    # prices 0.5, 1.5, ..., 9.5 on i0..i9; i9 has no price at all
    ix.upsert([pt(f"i{k}", "shoes" if k % 2 else "bags", vecs[k], **({"price": k + 0.5} if k < 9 else {}),
                  color="red" if k % 3 == 0 else "blue") for k in range(10)])
    q = vecs[0]

    def ids(**where):
        return {h.item_id for h in ix.search(q, limit=10, where=where)}

    assert ids(price=Range(gte=2, lte=5)) == {"i2", "i3", "i4"}
    assert ids(price=Range(gte=7.5)) == {"i7", "i8"}  # i9 has no price: a range never matches it
    assert ids(price=Range(lte=0.5)) == {"i0"}
    assert ids(price=Range(gte=2, lte=5), color="red") == {"i3"}
    assert {h.item_id for h in ix.search(q, limit=10, shards=["bags"], where={"price": Range(lte=4)})} == {"i0", "i2"}
    assert [len(r) for r in ix.search_batch(vecs[:2], limit=10, where={"price": Range(gte=100)})] == [0, 0]


def test_stale_versions_skipped_and_equal_version_idempotent(make_index, rng) -> None:
    ix = make_index()
    v = unit(rng, 3)
    ix.upsert([pt("a", "shoes", v[0], version=5, title="five")])
    res = ix.upsert([pt("a", "shoes", v[1], version=4, title="four")])
    assert res.applied == [] and res.stale == ["a"]
    assert ix.retrieve(["a"])[0].payload["title"] == "five"

    res = ix.upsert([pt("a", "shoes", v[2], version=5, title="five again")])
    assert res.applied == ["a"]
    rec = ix.retrieve(["a"], with_vectors=True)[0]
    assert rec.payload["title"] == "five again" and rec.version == 5
    np.testing.assert_allclose(rec.vector, v[2], atol=1e-6)
    assert ix.count() == 1

    # Within one batch the order of events decides, exactly like separate calls.
    res = ix.upsert([pt("a", "shoes", v[0], version=7), pt("a", "shoes", v[1], version=6)])
    assert res.applied == ["a"] and res.stale == ["a"]
    assert ix.stored_versions(["a"]) == {"a": 7}


def test_tombstones_block_late_upserts(make_index, rng) -> None:
    ix = make_index()
    v = unit(rng, 2)
    ix.upsert([pt("a", "shoes", v[0], version=1)])
    assert ix.delete(["a"], 3).applied == ["a"]
    assert ix.upsert([pt("a", "shoes", v[0], version=2)]).stale == ["a"]
    assert ix.upsert([pt("a", "shoes", v[0], version=3)]).stale == ["a"]  # equal to the tombstone
    assert ix.retrieve(["a"]) == [] and ix.count() == 0
    assert ix.delete(["a"], 2).stale == ["a"]  # older delete: the tombstone keeps version 3
    assert ix.stored_versions(["a"]) == {"a": 3}
    assert ix.upsert([pt("a", "bags", v[1], version=4)]).applied == ["a"]  # a newer create revives
    assert [r.shard for r in ix.retrieve(["a"])] == ["bags"] and ix.count("shoes") == 0


def test_unconditional_delete_uses_stored_version(make_index, rng) -> None:
    ix = make_index()
    v = unit(rng, 1)[0]
    ix.upsert([pt("a", "shoes", v, version=4)])
    assert ix.delete(["a", "never-seen"]).applied == ["a"]  # unknown id without version: no-op
    assert ix.stored_versions(["a", "never-seen"]) == {"a": 4}
    assert ix.upsert([pt("a", "shoes", v, version=4)]).stale == ["a"]  # redelivered create stays dead


def test_delete_before_create(make_index, rng) -> None:
    ix = make_index()
    v = unit(rng, 1)[0]
    assert ix.delete(["x", "y"], [5, 2]).applied == ["x", "y"]
    assert ix.stored_versions(["x", "y"]) == {"x": 5, "y": 2}
    assert ix.shards() == [] and ix.count() == 0  # the reserved tombstone shard is hidden
    res = ix.upsert([pt("x", "shoes", v, version=3), pt("y", "shoes", v, version=3)])
    assert res.stale == ["x"] and res.applied == ["y"]
    assert [r.item_id for r in ix.retrieve(["x", "y"])] == ["y"]
    assert ix.stored_versions(["y"]) == {"y": 3}
    with pytest.raises(IndexBackendError):
        ix.delete(["x", "y"], [1])


def test_category_move_removes_old_copy(make_index, rng) -> None:
    ix = make_index()
    v = unit(rng, 2)
    ix.upsert([pt("a", "shoes", v[0], version=1), pt("b", "shoes", v[1], version=1)])
    ix.upsert([pt("a", "bags", v[0], version=2)])
    assert ix.count("shoes") == 1 and ix.count("bags") == 1 and ix.count() == 2
    assert [h.item_id for h in ix.search(v[0], limit=10, shards=["shoes"])] == ["b"]
    hits = ix.search(v[0], limit=10)
    assert [h.item_id for h in hits].count("a") == 1 and hits[0].shard == "bags"
    # A delete after the move tombstones the new home only; an old-version write to the old shard is stale.
    ix.delete(["a"], 3)
    assert ix.upsert([pt("a", "shoes", v[0], version=2)]).stale == ["a"]
    assert ix.count() == 1


def test_limit_honoured_with_tombstones_present(make_index, rng) -> None:
    ix = make_index()
    vecs = unit(rng, 60)
    q = vecs[0]
    ix.upsert([pt(f"i{k}", "shoes", vecs[k]) for k in range(60)])
    nearest = [f"i{k}" for k in np.argsort(-(vecs @ q))]
    ix.delete(nearest[:40], 2)  # the 40 best matches are now tombstones
    hits = ix.search(q, limit=10)
    assert [h.item_id for h in hits] == nearest[40:50]
    assert ix.count() == 20


def test_dimension_and_input_errors(make_index, rng) -> None:
    ix = make_index()
    with pytest.raises(IndexBackendError):
        ix.upsert([pt("a", "shoes", np.ones(DIM + 1, np.float32))])
    with pytest.raises(IndexBackendError):
        ix.search(np.ones(DIM - 1, np.float32))
    with pytest.raises(IndexBackendError):
        ix.upsert([pt("a", "shoes", np.zeros(DIM, np.float32))])
    with pytest.raises(IndexBackendError):
        ix.upsert([pt("a", TOMBSTONE_SHARD, unit(rng, 1)[0])])
    with pytest.raises(IndexBackendError):
        ix.upsert([pt("a", "", unit(rng, 1)[0])])
    with pytest.raises(IndexBackendError):
        ix.upsert([pt("a", "shoes", unit(rng, 1)[0], version=-1)])
    assert ix.count() == 0
    ix.upsert([pt("a", "shoes", unit(rng, 1)[0])])
    ix.close()
    with pytest.raises(IndexBackendError):
        make_index(dim=DIM * 2)  # same storage, another dimension


def test_closed_index_refuses(make_index, rng) -> None:
    ix = make_index()
    ix.close()
    ix.close()  # idempotent
    with pytest.raises(IndexBackendError):
        ix.search(unit(rng, 1)[0])


def test_random_points_recall_vs_brute_force(make_index) -> None:
    rng = np.random.default_rng(0)
    dim, n = 32, 2000
    ix = make_index(dim=dim)
    vecs = unit(rng, n, dim)
    shards = ["a", "b", "c", "d"]
    for start in range(0, n, 500):
        ix.upsert([pt(f"i{k}", shards[k % 4], vecs[k]) for k in range(start, start + 500)])
    ix.optimize()
    assert ix.count() == n
    queries = unit(rng, 50, dim)
    truth = np.argsort(-(queries @ vecs.T), axis=1)[:, :10]
    found = 0
    for q, t in zip(queries, truth, strict=True):
        hits = ix.search(q, limit=10)
        assert len(hits) == 10
        found += len({h.item_id for h in hits} & {f"i{k}" for k in t})
    assert found / (10 * len(queries)) >= 0.95


def test_concurrent_writers_and_readers(make_index) -> None:
    rng = np.random.default_rng(3)
    ix = make_index()
    vecs = unit(rng, 200)
    errors: list[BaseException] = []

    def write(offset: int) -> None:
        try:
            for k in range(offset, 200, 4):
                ix.upsert([pt(f"i{k}", f"s{k % 3}", vecs[k])])
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def read() -> None:
        try:
            for k in range(50):
                ix.search(vecs[k], limit=5)
        except BaseException as exc:  # pragma: no cover
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(o,)) for o in range(4)] + [threading.Thread(target=read)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert ix.count() == 200
    assert ix.search(vecs[123], limit=1)[0].item_id == "i123"


# --- the title vector: the second named vector of a point (index/base.py) ------------------------

TEXT_DIM = 8


def titled(item_id: str, shard: str, vec: np.ndarray, title_vec: np.ndarray | None, version: int = 1,
           **payload) -> IndexPoint:
    return IndexPoint(item_id, shard, vec, payload, version, title_vector=title_vec)


def test_title_vectors_are_searched_by_name_beside_the_image(make_index, rng) -> None:
    ix = make_index(text_dim=TEXT_DIM)
    assert ix.text_dim == TEXT_DIM
    v, t = unit(rng, 3), unit(rng, 3, TEXT_DIM)
    ix.upsert([titled("a", "fruit", v[0], t[0]), titled("b", "fruit", v[1], t[1]),
               titled("c", "dairy", v[2], None)])  # c: no title, found by image only
    assert ix.count() == 3
    hits = ix.search(t[1], limit=3, using="title")
    assert [h.item_id for h in hits][:1] == ["b"] and {h.item_id for h in hits} == {"a", "b"}
    assert hits[0].score == pytest.approx(1.0, abs=1e-5) and hits[0].payload["item_id"] == "b"
    assert ix.search(v[2], limit=1)[0].item_id == "c"  # the image space is unchanged
    # filters and shards apply as to image search; batches too
    assert [h.item_id for h in ix.search(t[0], limit=3, using="title", shards=["dairy"])] == []
    assert ix.search_batch(t[:2], limit=1, using="title") == [
        ix.search(t[0], limit=1, using="title"), ix.search(t[1], limit=1, using="title")]


def test_title_vector_follows_the_point_through_writes(make_index, rng) -> None:
    ix = make_index(text_dim=TEXT_DIM)
    v, t = unit(rng, 2), unit(rng, 2, TEXT_DIM)
    ix.upsert([titled("a", "fruit", v[0], t[0]), titled("b", "fruit", v[1], t[1])])
    ix.upsert([titled("a", "veg", v[0], t[0], version=2)])  # a move keeps the title vector
    assert [h.shard for h in ix.search(t[0], limit=1, using="title")] == ["veg"]
    ix.upsert([titled("a", "veg", v[0], None, version=3)])  # a version without a title has none
    assert "a" not in {h.item_id for h in ix.search(t[0], limit=2, using="title")}
    ix.delete(["b"], 4)  # a tombstone has no vector of either name
    assert ix.search(t[1], limit=2, using="title") == []
    assert ix.count() == 1


def test_title_vectors_are_refused_where_the_index_has_none_or_of_another_size(make_index, rng) -> None:
    ix = make_index()
    assert ix.text_dim == 0
    v, t = unit(rng, 1), unit(rng, 1, TEXT_DIM)
    with pytest.raises(IndexBackendError, match="no title vectors"):
        ix.upsert([titled("a", "fruit", v[0], t[0])])
    with pytest.raises(IndexBackendError):
        ix.search(t[0], using="title")
    with pytest.raises(IndexBackendError, match="unknown vector"):
        ix.search(v[0], using="picture")
    ix.upsert([pt("a", "fruit", v[0])])
    ix.close()
    with pytest.raises(IndexBackendError, match="title vectors"):  # the storage records text_dim
        make_index(text_dim=TEXT_DIM)
    assert [r.item_id for r in make_index().retrieve(["a"])] == ["a"]  # and opens as it was made


def test_a_title_vector_of_the_wrong_size_is_refused(make_index, rng) -> None:
    ix = make_index(text_dim=TEXT_DIM)
    v, t = unit(rng, 1), unit(rng, 1, TEXT_DIM + 1)
    with pytest.raises(IndexBackendError, match="title vector shape"):
        ix.upsert([titled("a", "fruit", v[0], t[0])])
    with pytest.raises(IndexBackendError, match="title vector shape|dimension"):
        ix.search(t[0], using="title")
    assert ix.count() == 0
