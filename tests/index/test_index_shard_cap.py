"""``max_shards`` (index/placement.py): categories past the cap share one overflow shard and stay
apart there by the payload ``shard`` key. Over every backend via ``make_index``; the physical shard
count is read from the storage (``physical_shards``: Edge directories, Qdrant shard keys; local
mode is always one collection)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from index.base import OVERFLOW_SHARD, TOMBSTONE_SHARD, IndexBackendError, IndexPoint
from index.edge import OVERFLOW_DIR, EdgeIndex, shard_dir_name
from index.placement import ShardPlacement

DIM = 16  # make_index's default (tests/index/conftest.py)
CATS = [f"cat{k:02d}" for k in range(20)]  # cat00-cat02 dedicated with max_shards=4, the rest shared


def unit(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def pt(item_id: str, shard: str, vec: np.ndarray, version: int = 1) -> IndexPoint:
    return IndexPoint(item_id, shard, vec, {"title": item_id}, version)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(11)


def fill(ix, rng, cats=CATS, per_cat: int = 3) -> dict[str, set[str]]:
    """``per_cat`` items in each category, written in one batch (category order = placement order)."""
    vecs = unit(rng, len(cats) * per_cat)
    points = [pt(f"{c}-{k}", c, vecs[i * per_cat + k]) for i, c in enumerate(cats) for k in range(per_cat)]
    ix.upsert(points)
    return {c: {f"{c}-{k}" for k in range(per_cat)} for c in cats}


def assert_categories(ix, items: dict[str, set[str]], rng) -> None:
    """Every category's search, count and scan hold exactly its own items."""
    q = unit(rng, 1)[0]
    assert ix.shards() == sorted(items)
    for cat, ids in items.items():
        hits = ix.search(q, limit=100, shards=[cat])
        assert {h.item_id for h in hits} == ids, cat
        assert all(h.shard == cat for h in hits), cat
        assert ix.count(cat) == len(ids), cat
        assert {r.item_id for page in ix.scan(batch=2, shard=cat) for r in page} == ids, cat
    assert ix.count() == sum(len(ids) for ids in items.values())
    everything = set().union(*items.values())
    assert {h.item_id for h in ix.search(q, limit=1000)} == everything
    scanned = [r.item_id for page in ix.scan(batch=4) for r in page]
    assert sorted(scanned) == sorted(everything)  # each item once
    by_item = {i: c for c, ids in items.items() for i in ids}
    assert all(r.shard == by_item[r.item_id] for page in ix.scan() for r in page)


def test_categories_past_the_cap_share_one_shard(make_index, physical_shards, backend, rng) -> None:
    ix = make_index(max_shards=4)
    items = fill(ix, rng)
    assert physical_shards() == (1 if backend == "qdrant-local" else 4)
    assert ix.shards() == CATS
    assert_categories(ix, items, rng)
    q = unit(rng, 1)[0]
    mixed = ix.search(q, limit=100, shards=["cat01", "cat07", "cat19"])  # a dedicated and two shared
    assert {h.item_id for h in mixed} == items["cat01"] | items["cat07"] | items["cat19"]
    assert [h.score for h in mixed] == sorted((h.score for h in mixed), reverse=True)
    batched = ix.search_batch(unit(rng, 3), limit=100, shards=["cat05"])
    assert all({h.item_id for h in hits} == items["cat05"] for hits in batched)
    assert {h.item_id for h in ix.search(q, limit=100, shards=["cat05"], where={"title": "cat05-1"})} == {"cat05-1"}
    assert {h.item_id for h in ix.search(q, limit=100, shards=["cat05"], where={"title": "cat06-1"})} == set()


def test_moves_between_shared_and_dedicated_categories(make_index, physical_shards, backend, rng) -> None:
    ix = make_index(max_shards=4)
    items = fill(ix, rng)
    v = unit(rng, 1)[0]
    # Shared -> shared: one physical shard, one point id: an overwrite with a new payload key.
    ix.upsert([pt("cat05-0", "cat06", v, version=2)])
    items["cat05"].discard("cat05-0")
    items["cat06"].add("cat05-0")
    assert_categories(ix, items, rng)
    assert [r.shard for r in ix.retrieve(["cat05-0"])] == ["cat06"]
    # Shared -> dedicated, and dedicated -> shared.
    ix.upsert([pt("cat06-1", "cat00", v, version=2), pt("cat01-2", "cat09", v, version=2)])
    items["cat06"].discard("cat06-1")
    items["cat00"].add("cat06-1")
    items["cat01"].discard("cat01-2")
    items["cat09"].add("cat01-2")
    assert_categories(ix, items, rng)
    # Back and forth within the shared shard in one batch: the last write wins, one copy.
    ix.upsert([pt("cat05-0", "cat07", v, version=3), pt("cat05-0", "cat08", v, version=4)])
    items["cat06"].discard("cat05-0")
    items["cat08"].add("cat05-0")
    assert_categories(ix, items, rng)
    # An older write to the old category is stale and does not bring a second copy.
    assert ix.upsert([pt("cat05-0", "cat05", v, version=3)]).stale == ["cat05-0"]
    assert_categories(ix, items, rng)
    assert physical_shards() == (1 if backend == "qdrant-local" else 4)


def test_delete_and_tombstones_in_the_shared_shard(make_index, physical_shards, backend, rng) -> None:
    ix = make_index(max_shards=4)
    items = fill(ix, rng)
    v = unit(rng, 1)[0]
    assert ix.delete(["cat10-1"], 2).applied == ["cat10-1"]
    items["cat10"].discard("cat10-1")
    assert_categories(ix, items, rng)
    assert ix.upsert([pt("cat10-1", "cat10", v, version=2)]).stale == ["cat10-1"]  # equal: stays dead
    assert ix.upsert([pt("cat10-1", "cat11", v, version=1)]).stale == ["cat10-1"]
    assert ix.stored_versions(["cat10-1"]) == {"cat10-1": 2}
    assert ix.retrieve(["cat10-1"]) == []
    # A delete before the create: its tombstone shares the overflow shard (no shard of its own).
    assert ix.delete(["ghost"], 5).applied == ["ghost"]
    assert ix.upsert([pt("ghost", "cat12", v, version=4)]).stale == ["ghost"]
    assert TOMBSTONE_SHARD not in ix.shards() and physical_shards() == (1 if backend == "qdrant-local" else 4)
    assert_categories(ix, items, rng)
    # Newer creates revive: one into a shared category, one (the ghost) into a dedicated one.
    assert ix.upsert([pt("cat10-1", "cat11", v, version=3), pt("ghost", "cat02", v, version=6)]).applied == [
        "cat10-1", "ghost"]
    items["cat11"].add("cat10-1")
    items["cat02"].add("ghost")
    assert_categories(ix, items, rng)
    assert ix.delete(["cat11-0", "cat10-1"]).applied == ["cat11-0", "cat10-1"]  # version=None
    items["cat11"] -= {"cat11-0", "cat10-1"}
    assert_categories(ix, items, rng)
    assert ix.stored_versions(["cat11-0", "cat10-1"]) == {"cat11-0": 1, "cat10-1": 3}


def test_reopen_keeps_each_category_where_it_was(make_index, physical_shards, backend, rng) -> None:
    ix = make_index(max_shards=4)
    items = fill(ix, rng, CATS[:10])
    ix.close()
    ix = make_index(max_shards=4)
    assert ix.shards() == CATS[:10]
    assert_categories(ix, items, rng)
    ix.upsert([pt("new-0", "cat09", unit(rng, 1)[0]), pt("new-1", "cat00", unit(rng, 1)[0])])
    items["cat09"].add("new-0")
    items["cat00"].add("new-1")
    assert_categories(ix, items, rng)
    ix.close()
    # A higher cap: the shared categories stay shared, only a new category gets a shard of its own.
    ix = make_index(max_shards=8)
    items |= fill(ix, rng, ["late"])
    assert_categories(ix, items, rng)
    assert physical_shards() == (1 if backend == "qdrant-local" else 5)
    ix.close()
    # A lower cap than the dedicated shards already there: they keep working, new ones share.
    ix = make_index(max_shards=2)
    items |= fill(ix, rng, ["later"])
    assert_categories(ix, items, rng)
    assert physical_shards() == (1 if backend == "qdrant-local" else 5)


def test_an_uncapped_index_keeps_its_shards_under_a_cap(make_index, physical_shards, backend, rng) -> None:
    ix = make_index(max_shards=None)
    items = fill(ix, rng, CATS[:6])
    ix.delete(["ghost"], 1)
    assert physical_shards() == (1 if backend == "qdrant-local" else 7)  # + the tombstone shard
    ix.close()
    ix = make_index(max_shards=4)
    assert_categories(ix, items, rng)
    items |= fill(ix, rng, CATS[6:9])
    ix.upsert([pt("cat00-0", "cat08", unit(rng, 1)[0], version=2)])  # dedicated -> shared
    items["cat00"].discard("cat00-0")
    items["cat08"].add("cat00-0")
    assert_categories(ix, items, rng)
    assert ix.stored_versions(["ghost"]) == {"ghost": 1}
    assert physical_shards() == (1 if backend == "qdrant-local" else 8)  # one overflow shard more


def test_overflow_name_and_bad_caps_are_refused(make_index, rng) -> None:
    ix = make_index(max_shards=4)
    with pytest.raises(IndexBackendError, match="reserved"):
        ix.upsert([pt("a", OVERFLOW_SHARD, unit(rng, 1)[0])])
    for bad in (0, -1, 2.5, True):
        with pytest.raises(IndexBackendError, match="max_shards"):
            make_index(max_shards=bad)


def test_max_shards_1_shares_everything(make_index, physical_shards, backend, rng) -> None:
    ix = make_index(max_shards=1)
    items = fill(ix, rng, CATS[:5])
    assert physical_shards() == 1
    assert_categories(ix, items, rng)


def test_placement_plan() -> None:
    p = ShardPlacement(3)
    assert [p.place(k) for k in ("a", "b", "c", TOMBSTONE_SHARD, "d")] == ["a", "b", OVERFLOW_SHARD,
                                                                         OVERFLOW_SHARD, OVERFLOW_SHARD]
    assert p.plan(["a", "c", "d", "unknown"]) == {"a": None, OVERFLOW_SHARD: ["c", "d"]}
    assert p.plan(None) == {"a": None, "b": None, OVERFLOW_SHARD: None}
    assert p.target("e") == OVERFLOW_SHARD and p.physical("e") is None
    uncapped = ShardPlacement(None, ["a"])
    assert uncapped.place(TOMBSTONE_SHARD) == TOMBSTONE_SHARD
    assert uncapped.plan(None) == {"a": None}  # a shard of tombstones only has nothing to search


def test_edge_manifest_lists_the_shared_categories(tmp_path, rng) -> None:
    with EdgeIndex(tmp_path, DIM, max_shards=4) as ix:
        fill(ix, rng, CATS[:3])
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["format"] == 1 and "shared" not in manifest  # still readable by pre-cap code
    with EdgeIndex(tmp_path, DIM, max_shards=4) as ix:
        fill(ix, rng, CATS[3:])
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["format"] == 2
    assert manifest["shards"] == {shard_dir_name(c): c for c in CATS[:3]}
    assert manifest["shared"] == {OVERFLOW_DIR: CATS[3:]}
    dirs = sorted(p.name for p in (tmp_path / "shards").iterdir())
    assert dirs == sorted([OVERFLOW_DIR, *(shard_dir_name(c) for c in CATS[:3])])


def test_open_index_passes_the_setting(tmp_path, rng) -> None:
    from pydantic import ValidationError

    from index.factory import generation_dir, open_index
    from index.settings import EdgeIndexSettings, QdrantIndexSettings

    settings = EdgeIndexSettings(dir=tmp_path, max_shards=3)
    with open_index(settings, DIM, model_id="m") as ix:
        fill(ix, rng, CATS[:5], per_cat=1)
        assert ix.count("cat04") == 1
    assert len(list((generation_dir(settings, "m") / "shards").iterdir())) == 3
    assert EdgeIndexSettings().max_shards == QdrantIndexSettings(url=":memory:").max_shards == 32
    with pytest.raises(ValidationError, match="max_shards"):
        EdgeIndexSettings(max_shards=0)
