"""``VectorIndex.scan`` over every backend, and the generations: the serving pointer (Edge file,
Qdrant alias), transitions, ``ServingHolder``'s one-generation-per-query guarantee and its background
refresh, and ``WriteTargets``' cached fan-out."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from index.base import IndexBackendError, IndexPoint
from index.factory import collection_for, generation_dir, open_index
from index.generations import GenerationManager
from index.serving import ServingHolder
from index.settings import EdgeIndexSettings, QdrantIndexSettings
from index.state import POINTER_FILE, GenerationError
from index.targets import WriteTargets

DIM = 16


def unit(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# --- scan (contract, both backends via tests/index/conftest.py) ----------------------------------


def test_scan_pages_live_records_once(make_index) -> None:
    ix = make_index()
    rng = np.random.default_rng(3)
    v = unit(rng, 25)
    ix.upsert([IndexPoint(f"i{k}", ["shoes", "bags"][k % 2], v[k], {"title": f"t{k}"}, 1) for k in range(25)])
    ix.delete(["i0", "i1"], 2)  # tombstones: never scanned
    ix.delete(["ghost"], 5)  # tombstone of an unknown id (reserved shard): never scanned
    ix.upsert([IndexPoint("i2", "hats", v[2], {"title": "moved"}, 3)])  # moved: scanned once, new shard

    pages = list(ix.scan(batch=4))
    assert all(1 <= len(p) <= 4 for p in pages)
    recs = [r for p in pages for r in p]
    ids = [r.item_id for r in recs]
    assert len(ids) == len(set(ids)) == 23 == ix.count()
    assert set(ids) == {f"i{k}" for k in range(2, 25)}
    moved = next(r for r in recs if r.item_id == "i2")
    assert (moved.shard, moved.version, moved.payload["title"]) == ("hats", 3, "moved")
    assert moved.vector is None

    shoes = [r for p in ix.scan(batch=100, shard="shoes", with_vectors=True) for r in p]
    assert {r.shard for r in shoes} == {"shoes"} and len(shoes) == ix.count("shoes")
    k = int(shoes[0].item_id[1:])
    np.testing.assert_allclose(shoes[0].vector, v[k], atol=1e-6)
    assert list(ix.scan(shard="nope")) == []
    with pytest.raises(IndexBackendError):
        next(ix.scan(batch=0))


# --- the manager over Edge -------------------------------------------------------------------------


class RecordingRegistry:
    def __init__(self) -> None:
        self.active: list[str] = []

    def set_active(self, name: str) -> None:
        self.active.append(name)


@pytest.fixture
def settings(tmp_path) -> EdgeIndexSettings:
    return EdgeIndexSettings(dir=tmp_path / "var" / "index")


def test_edge_pointer_transitions_and_atomic_file(settings) -> None:
    reg = RecordingRegistry()
    mgr = GenerationManager(settings, activator=reg)
    assert mgr.serving() is None and mgr.write_targets() == []
    with pytest.raises(GenerationError):
        mgr.begin("b@1", name="b", dim=8)  # nothing serves yet
    mgr.adopt("a@1", name="a", dim=16)
    mgr.begin("b@1", name="b", dim=8)
    with pytest.raises(GenerationError):
        mgr.begin("c@1", name="c", dim=8)  # one build at a time
    assert (mgr.serving(), mgr.building()) == ("a@1", "b@1")
    assert GenerationManager(settings).write_targets() == ["a@1", "b@1"]

    pointer = settings.dir / POINTER_FILE
    on_disk = json.loads(pointer.read_text())
    assert on_disk["serving"] == "a@1" and on_disk["building"] == "b@1"
    assert on_disk["generations"]["b@1"] == {"name": "b", "dim": 8}

    mgr.switch("b@1")
    assert (mgr.serving(), mgr.building(), mgr.previous()) == ("b@1", None, "a@1")
    assert reg.active == ["b"]
    assert json.loads(pointer.read_text())["serving"] == "b@1"
    assert [p.name for p in settings.dir.iterdir()] == [POINTER_FILE]  # no temp files left
    assert GenerationManager(settings).serving() == "b@1"  # another process's view
    assert mgr.write_targets() == ["b@1", "a@1"]  # previous is kept fresh for rollback

    with pytest.raises(GenerationError):
        mgr.drop_generation("b@1")  # serving
    mgr.rollback()
    assert (mgr.serving(), mgr.previous()) == ("a@1", "b@1") and reg.active == ["b", "a"]

    ix = open_index(settings, 8, model_id="b@1")
    ix.upsert([IndexPoint("x", "s", np.ones(8, np.float32), {}, 1)])
    ix.close()
    assert generation_dir(settings, "b@1").exists()
    mgr.drop_generation("b@1")
    assert not generation_dir(settings, "b@1").exists()
    assert mgr.previous() is None and "b@1" not in mgr.state().generations
    with pytest.raises(GenerationError):
        mgr.rollback()

    mgr.begin("c@1", name="c", dim=4)
    mgr.abort()
    assert mgr.building() is None and mgr.serving() == "a@1"


def test_pointer_replace_is_atomic_under_concurrent_readers(settings) -> None:
    """Readers polling the pointer during many switches always parse a whole file naming A or B."""
    mgr = GenerationManager(settings)
    mgr.adopt("a@1", name="a", dim=4)
    mgr.begin("b@1", name="b", dim=4)
    seen: set[str] = set()
    errors: list[Exception] = []
    stop = threading.Event()

    def reader() -> None:
        other = GenerationManager(settings)
        while not stop.is_set():
            try:
                seen.add(other.serving() or "none")
            except Exception as e:  # a torn/partial file would land here
                errors.append(e)

    t = threading.Thread(target=reader)
    t.start()
    for i in range(40):
        mgr.switch("b@1" if i % 2 == 0 else "a@1")
    stop.set()
    t.join()
    assert errors == [] and seen <= {"a@1", "b@1"}


# --- ServingHolder: one generation per query ----------------------------------------------------------


class TaggedPipeline:
    def __init__(self, model_id: str, dim: int) -> None:
        self.model_id, self.dim = model_id, dim

    def embed(self, seed: int) -> np.ndarray:
        v = np.random.default_rng(seed).standard_normal(self.dim).astype(np.float32)
        return v / np.linalg.norm(v)


def test_query_during_switch_uses_one_consistent_pair(settings) -> None:
    mgr = GenerationManager(settings)
    mgr.adopt("a@1", name="a", dim=16)
    mgr.begin("b@1", name="b", dim=8)
    rng = np.random.default_rng(0)
    for model_id, dim in (("a@1", 16), ("b@1", 8)):
        with mgr.opened(model_id) as ix:
            ix.upsert([IndexPoint(f"i{k}", "s", unit(rng, 1, dim)[0], {"gen": model_id}, 1) for k in range(5)])
    pipes = {"a": TaggedPipeline("a@1", 16), "b": TaggedPipeline("b@1", 8)}
    holder = ServingHolder(mgr, lambda name: pipes[name])
    holder.refresh()

    in_query, release = threading.Event(), threading.Event()
    result: dict[str, object] = {}

    def query() -> None:
        with holder.use() as h:  # the reference is taken once...
            first = h.pipeline.embed(1)
            in_query.set()
            release.wait(5)  # ...a switch happens here...
            hits = h.index.search(first, limit=3)  # ...and the query still uses its own pair
            result["pair"] = (h.pipeline.model_id, {x.payload["gen"] for x in hits}, h.index.dim)

    t = threading.Thread(target=query)
    t.start()
    assert in_query.wait(5)
    old_index = holder.current().index
    mgr.switch("b@1")
    assert holder.refresh() is True and holder.model_id == "b@1"
    with holder.use() as h:  # a new query sees the new pair
        assert h.pipeline.model_id == "b@1" and h.index.dim == 8
        assert {x.payload["gen"] for x in h.index.search(h.pipeline.embed(2), limit=3)} == {"b@1"}
    old_index.count()  # retired but still open: a query holds it
    release.set()
    t.join()
    assert result["pair"] == ("a@1", {"a@1"}, 16)
    with pytest.raises(IndexBackendError):
        old_index.count()  # released once its last query ended
    assert holder.refresh() is False
    holder.close()


# --- Qdrant: the alias is the pointer ----------------------------------------------------------------


def test_qdrant_memory_alias_switch_and_rollback(tmp_path) -> None:
    s = QdrantIndexSettings(url=":memory:", collection="shop")
    mgr = GenerationManager(s)
    try:
        rng = np.random.default_rng(1)
        mgr.adopt("a@1", name="a", dim=16)
        mgr.begin("b@1", name="b", dim=8)
        for model_id, dim in (("a@1", 16), ("b@1", 8)):
            with mgr.opened(model_id) as ix:
                ix.upsert([IndexPoint("x", "s", unit(rng, 1, dim)[0], {"gen": model_id}, 1)])
        client = mgr.store.client
        alias_target = {a.alias_name: a.collection_name for a in client.get_aliases().aliases}
        assert alias_target["shop"] == collection_for(s, "a@1")
        # Clients querying the alias see only the serving generation's vectors.
        hits = client.query_points("shop", query=unit(rng, 1, 16)[0].tolist(), using="image", limit=5).points
        assert {h.payload["gen"] for h in hits} == {"a@1"}

        mgr.switch("b@1")
        alias_target = {a.alias_name: a.collection_name for a in client.get_aliases().aliases}
        assert alias_target["shop"] == collection_for(s, "b@1")
        assert (mgr.serving(), mgr.building(), mgr.previous()) == ("b@1", None, "a@1")
        hits = client.query_points("shop", query=unit(rng, 1, 8)[0].tolist(), using="image", limit=5).points
        assert {h.payload["gen"] for h in hits} == {"b@1"}
        with mgr.opened("b@1") as ix:
            assert "shop" in ix.aliases()

        mgr.rollback()
        assert mgr.serving() == "a@1"
        mgr.drop_generation("b@1")
        assert not client.collection_exists(collection_for(s, "b@1"))
    finally:
        mgr.close()


# --- the background refresh: a request never waits for a model load --------------------------------


def test_serving_follows_a_switch_in_the_background_while_queries_go_on(settings) -> None:
    import time

    mgr = GenerationManager(settings)
    mgr.adopt("a@1", name="a", dim=8)
    mgr.begin("b@1", name="b", dim=8)
    loading = threading.Event()

    def factory(name: str) -> TaggedPipeline:
        if name == "b":
            loading.set()
            time.sleep(0.6)  # a slow model load
        return TaggedPipeline(f"{name}@1", 8)

    holder = ServingHolder(mgr, factory)
    holder.refresh()
    holder.start_refresher(0.05)
    mgr.switch("b@1")
    assert loading.wait(5)
    t0 = time.perf_counter()
    with holder.use() as h:  # during the load: the old pair serves at once
        assert h.model_id == "a@1"
    assert time.perf_counter() - t0 < 0.1
    deadline = time.monotonic() + 5
    while holder.model_id != "b@1" and time.monotonic() < deadline:
        time.sleep(0.02)
    assert holder.model_id == "b@1" and holder.last_error is None
    holder.close()
    mgr.close()


def test_a_failed_refresh_keeps_the_old_pair_serving(settings) -> None:
    import time

    mgr = GenerationManager(settings)
    mgr.adopt("a@1", name="a", dim=8)
    mgr.begin("b@1", name="b", dim=8)

    def factory(name: str) -> TaggedPipeline:
        if name == "b":
            raise FileNotFoundError("b.onnx is missing")
        return TaggedPipeline("a@1", 8)

    holder = ServingHolder(mgr, factory)
    holder.refresh()
    holder.start_refresher(0.02)
    mgr.switch("b@1")
    deadline = time.monotonic() + 5
    while holder.last_error is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert "b.onnx is missing" in holder.last_error
    with holder.use() as h:
        assert h.model_id == "a@1"
    holder.close()
    mgr.close()


# --- write targets: cached, refreshed when the state changes ----------------------------------------


def test_write_targets_follow_the_state_without_rereading_it_per_batch(settings) -> None:
    mgr = GenerationManager(settings)
    mgr.adopt("a@1", name="a", dim=8)
    targets = WriteTargets(mgr)
    first = targets.current()
    assert [(t.model_id, t.role, t.required) for t in first] == [("a@1", "serving", True)]
    reads = []
    real_state = mgr.state
    mgr.state = lambda: reads.append(1) or real_state()
    for _ in range(20):
        assert [t.model_id for t in targets.current()] == ["a@1"]
    assert reads == [] and targets.refreshes == 1  # one stat per call, no state read

    mgr.state = real_state
    GenerationManager(settings).begin("b@1", name="b", dim=8)  # another process begins a build
    now = targets.current()
    assert [(t.model_id, t.role, t.required) for t in now] == [("a@1", "serving", True), ("b@1", "building", True)]
    assert now[0].index is first[0].index  # the serving index is kept open, not reopened
    GenerationManager(settings).switch("b@1")
    assert [(t.model_id, t.role, t.required) for t in targets.current()] == [
        ("b@1", "serving", True), ("a@1", "previous", False)]
    GenerationManager(settings).drop_generation("a@1")
    assert [t.model_id for t in targets.current()] == ["b@1"]
    targets.close()
    mgr.close()


def test_write_targets_on_qdrant_reread_on_a_timer(tmp_path) -> None:
    import time

    s = QdrantIndexSettings(url=":memory:", collection="wt")
    mgr = GenerationManager(s)
    try:
        mgr.adopt("a@1", name="a", dim=8)
        targets = WriteTargets(mgr, recheck_s=0.2)
        assert [t.model_id for t in targets.current()] == ["a@1"]
        mgr.begin("b@1", name="b", dim=8)
        assert [t.model_id for t in targets.current()] == ["a@1"]  # not re-read yet
        time.sleep(0.25)
        assert [t.model_id for t in targets.current()] == ["a@1", "b@1"]
        targets.close()
    finally:
        mgr.close()
