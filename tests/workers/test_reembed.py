"""Blue/green re-embedding (``workers.reembed``) on the real EdgeIndex with two fake models of
different dimensions: serving stays on the old generation until the switch, events during the
build reach both, a failed item is reported without blocking the rest, rollback works."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from events.item import CatalogItem
from events.models import ItemDeleted, ItemUpserted
from index.factory import open_index
from index.generations import GenerationManager
from index.serving import ServingHolder
from index.settings import EdgeIndexSettings
from index.state import POINTER_FILE, GenerationError
from query.searcher import Searcher
from tests.workers.workers_testlib import RecordingDeadLetters, ScriptedFetcher, image_bytes, sourced
from vision.settings import ImageSettings, RuntimeSettings
from workers import reembed as rj
from workers import runtime as worker_runtime
from workers.batch import apply_batch
from workers.celery_app import REEMBED_TASK
from workers.fetch import FetchError, FetchSettings
from workers.pipeline import ingest_items
from workers.runtime import build_runtime
from workers.settings import WorkerSettings


class ThumbEmbedder:
    """``side``x``side`` thumbnail + 1 as a unit vector: model A is 8x8 (192-d), model B 4x4 (48-d)."""

    def __init__(self, model_id: str, side: int, gate=None) -> None:
        self.model_id, self.side, self.dim = model_id, side, side * side * 3
        self.gate = gate  # callable run before embedding (blocks the re-embed thread in a test)
        self.calls = 0

    def embed_catalog(self, images, batch_size=32):
        self.calls += 1
        if self.gate is not None:
            self.gate()
        out = np.stack([np.asarray(im.convert("RGB").resize((self.side, self.side)), np.float32).ravel() + 1.0
                        for im in images])
        return out / np.linalg.norm(out, axis=1, keepdims=True)


COLORS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200), (200, 30, 200),
          (90, 90, 90), (250, 140, 0), (0, 90, 250), (120, 0, 60)]


def item(k: int, version: int = 1, ref: str | None = None) -> CatalogItem:
    return CatalogItem(item_id=f"sku-{k}", title=f"Item {k}", category_path=("Fruit" if k % 2 else "Veg", "x"),
                       image=ref or f"img/{k}", version=version, price=1.0 + k, shop="s1")


@pytest.fixture
def env(tmp_path):
    settings = EdgeIndexSettings(dir=tmp_path / "var" / "index")
    script = {f"img/{k}": image_bytes(COLORS[k]) for k in range(len(COLORS))}
    fetcher = ScriptedFetcher(script)
    models = {"a": ThumbEmbedder("a@1", 8), "b": ThumbEmbedder("b@1", 4)}
    mgr = GenerationManager(settings)
    # Generation A: the catalog as the serving model indexed it.
    with open_index(settings, 192, model_id="a@1") as ix:
        ingest_items([item(k) for k in range(8)], index=ix, embedder=models["a"], fetcher=fetcher)
    mgr.adopt("a@1", name="a", dim=192)
    rt = build_runtime(worker=WorkerSettings(embedder="thumbnail", ingest_batch_size=4), runtime=RuntimeSettings(),
                       image=ImageSettings(), index=settings, fetch=FetchSettings(), dead_letters=RecordingDeadLetters())
    rt.load = models.__getitem__
    rt.fetcher = rt.embedding.fetcher = fetcher
    rt.embedding.load = lambda m: models[m.name]
    yield rt, mgr, models, fetcher
    rt.close()
    mgr.close()


def up(k: int, version: int = 1, ref: str | None = None) -> ItemUpserted:
    it = item(k, version, ref)
    return ItemUpserted(item_id=it.item_id, version=version, title=it.title, category_path=it.category_path,
                        images=(it.image,), price=it.price, shop=it.shop)


def query_vec(models, name: str, k: int) -> np.ndarray:
    from PIL import Image

    return models[name].embed_catalog([Image.new("RGB", (16, 16), COLORS[k])])[0]


def test_reembed_while_serving_events_reach_both_then_switch_and_rollback(env) -> None:
    rt, mgr, models, fetcher = env
    started, go = threading.Event(), threading.Event()

    def gate() -> None:  # hold the re-embed's first batch until the test has done its checks
        if threading.current_thread().name == "reembed" and not go.is_set():
            started.set()
            assert go.wait(10)

    models["b"].gate = gate
    holder = ServingHolder(mgr, lambda name: models[name])
    holder.refresh()
    out: dict = {}
    t = threading.Thread(target=lambda: out.update(rep=rj.reembed(rt, "b", progress=False)), name="reembed")
    t.start()
    assert started.wait(10)
    assert (mgr.serving(), mgr.building()) == ("a@1", "b@1")

    # Serving reads the old generation during the build.
    with holder.use() as h:
        _, hits = Searcher(h.index, h.pipeline).search_vector(query_vec(models, "a", 3), limit=3)
        assert h.pipeline.model_id == "a@1" and hits[0].item_id == "sku-3"

    # Events during the build, through the worker's batch: they reach both generations.
    fetcher.script["img/new"] = image_bytes(COLORS[8])
    fetcher.script["img/upd"] = image_bytes(COLORS[9])
    calls = len(fetcher.calls)
    out_batch = apply_batch(sourced(up(8, ref="img/new"), up(1, version=2, ref="img/upd"),
                                    ItemDeleted(item_id="sku-2", version=5)), rt)
    assert sorted(out_batch.indexed) == ["sku-1", "sku-8"] and out_batch.deleted == ["sku-2"]
    assert len(fetcher.calls) == calls + 2  # fetched once each, embedded with both models
    with mgr.opened("b@1") as ix_b:
        assert {r.item_id: r.version for r in ix_b.retrieve(["sku-1", "sku-8", "sku-2"])} == {"sku-1": 2, "sku-8": 1}
        assert ix_b.stored_versions(["sku-2"]) == {"sku-2": 5}  # tombstone: the copy cannot resurrect it
    assert mgr.serving() == "a@1"

    go.set()
    t.join(30)
    rep = out["rep"]
    assert rep.switched and rep.missing == [] and rep.failures == [] and rep.extra == []
    assert rep.source_count == rep.target_count == 8  # 8 built - 1 deleted + 1 created
    assert rep.already >= 1  # the copy skipped what the dual writes had already put there
    assert '"serving": "b@1"' in (mgr.settings.dir / POINTER_FILE).read_text()
    assert (mgr.serving(), mgr.previous(), mgr.building()) == ("b@1", "a@1", None)

    # Serving follows the pointer; the new generation has the event's version, in its own dimension.
    assert holder.refresh()
    with holder.use() as h:
        assert h.pipeline.model_id == "b@1" and h.index.dim == 48
        _, hits = Searcher(h.index, h.pipeline).search_vector(query_vec(models, "b", 9), limit=3)
        assert hits[0].item_id == "sku-1"
        assert {r.item_id for p in h.index.scan() for r in p} == {f"sku-{k}" for k in range(9)} - {"sku-2"}
        assert h.index.retrieve(["sku-3"])[0].payload["model_id"] == "b@1"

    mgr.rollback()
    assert holder.refresh() and holder.model_id == "a@1"
    with holder.use() as h:
        _, hits = Searcher(h.index, h.pipeline).search_vector(query_vec(models, "a", 8), limit=3)
        assert hits[0].item_id == "sku-8"
    holder.close()


def test_failed_item_is_reported_blocks_nothing_else(env) -> None:
    rt, mgr, models, fetcher = env
    fetcher.script["img/5"] = FetchError("missing", "gone from the object store")
    rep = rj.reembed(rt, "b", progress=False)
    assert [(f.item_id, f.reason) for f in rep.failures] == [("sku-5", "missing")]
    assert rep.missing == ["sku-5"] and not rep.switched and rep.repaired == 1
    assert (mgr.serving(), mgr.building()) == ("a@1", "b@1")
    with mgr.opened("b@1") as ix_b:
        assert ix_b.count() == 7  # the rest of its batch and of the catalog went in

    # Re-running resumes (nothing re-embedded), and an operator may accept the gap.
    calls = models["b"].calls
    rep = rj.reembed(rt, "b", progress=False, allow_missing=1)
    assert rep.switched and rep.missing == ["sku-5"] and rep.already == 7 and rep.indexed == 0
    assert models["b"].calls == calls  # only sku-5's failed attempts: no embedding at all
    assert mgr.serving() == "b@1"


class EagerApp:
    """Sends by name as a Celery app does, and runs the task at once in this process."""

    class conf:  # noqa: N801
        task_always_eager = True

    def __init__(self) -> None:
        self.sent: list[str] = []

    def send_task(self, name, args=(), **_):
        from workers.tasks import reembed_batch

        self.sent.append(name)
        assert name == REEMBED_TASK
        return reembed_batch.apply(args=args)


def test_via_celery_task_path(env) -> None:
    """The tongkuan.reembed_batch task, sent by name, run by the worker's task on its runtime."""
    rt, mgr, models, fetcher = env
    previous = worker_runtime.set_runtime(rt)
    try:
        app = EagerApp()
        rep = rj.reembed(rt, "b", app=app, progress=False)
    finally:
        worker_runtime.set_runtime(previous)
    assert rep.switched and rep.indexed == 8 and rep.target_count == 8
    assert set(app.sent) == {REEMBED_TASK} and len(app.sent) == 2  # 8 items in pages of 4


def test_stale_task_writes_nothing_and_edge_refuses_real_celery(env) -> None:
    rt, mgr, models, fetcher = env
    out = rj.reembed_items([item(0)], model_name="b", runtime=rt)
    assert out["skipped"] == ["sku-0"] and out["indexed"] == []  # b is not being built

    class RealApp(EagerApp):
        class conf:  # noqa: N801
            task_always_eager = False

    with pytest.raises(GenerationError, match="qdrant"):
        rj.reembed(rt, "b", app=RealApp(), progress=False)
