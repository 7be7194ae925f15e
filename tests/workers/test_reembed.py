"""Blue/green re-embedding (``workers.reembed``) on the real EdgeIndex with two fake models of
different dimensions: serving stays on the old generation until the switch, events during the
build reach both, a failed item is reported without blocking the rest, rollback works."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from events.item import CatalogItem
from index.generations import POINTER_FILE, GenerationManager, acquire_index, release_index
from query.searcher import Searcher
from tests.workers.workers_testlib import ScriptedFetcher, image_bytes
from tongkuan.settings import Settings
from workers import reembed as rj
from workers.celery_app import app
from workers.fetch import FetchError
from workers.pipeline import ingest_items


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
    settings = Settings(data_dir=tmp_path / "var", model_dir=tmp_path / "models", ingest_batch_size=4)
    script = {f"img/{k}": image_bytes(COLORS[k]) for k in range(len(COLORS))}
    fetcher = ScriptedFetcher(script)
    models = {"a": ThumbEmbedder("a@1", 8), "b": ThumbEmbedder("b@1", 4)}
    rj.set_pipeline_factory(lambda s, name: models[name], fetcher)
    mgr = GenerationManager(settings, registry=None)
    # Generation A: the catalog as the serving model indexed it.
    ix = acquire_index(settings, 192, model_id="a@1")
    ingest_items([item(k) for k in range(8)], index=ix, embedder=models["a"], fetcher=fetcher)
    release_index(settings, ix)
    mgr.adopt("a@1", name="a", dim=192)
    yield settings, mgr, models, fetcher
    rj.set_pipeline_factory(None)
    mgr.close()


def query_vec(models, name: str, k: int) -> np.ndarray:
    from PIL import Image

    return models[name].embed_catalog([Image.new("RGB", (16, 16), COLORS[k])])[0]


def test_reembed_while_serving_events_reach_both_then_switch_and_rollback(env) -> None:
    settings, mgr, models, fetcher = env
    started, go = threading.Event(), threading.Event()

    def gate() -> None:  # hold the re-embed's first batch until the test has done its checks
        if threading.current_thread().name == "reembed" and not go.is_set():
            started.set()
            assert go.wait(10)

    models["b"].gate = gate
    holder = mgr.open_serving(lambda name: models[name])
    out: dict = {}
    t = threading.Thread(target=lambda: out.update(rep=rj.reembed(settings, "b", progress=False, manager=mgr)),
                         name="reembed")
    t.start()
    assert started.wait(10)
    assert (mgr.serving(), mgr.building()) == ("a@1", "b@1")

    # Serving reads the old generation during the build.
    with holder.use() as h:
        _, hits = Searcher(h.index, h.pipeline).search_vector(query_vec(models, "a", 3), limit=3)
        assert h.pipeline.model_id == "a@1" and hits[0].item_id == "sku-3"

    # Events during the build: through the dual-write hook the worker task will call.
    fetcher.script["img/new"] = image_bytes(COLORS[8])
    fetcher.script["img/upd"] = image_bytes(COLORS[9])
    with mgr.opened("a@1") as ix_a:
        rep = rj.ingest_to_targets([item(8, ref="img/new"), item(1, version=2, ref="img/upd")],
                                   index=ix_a, embedder=models["a"], fetcher=fetcher, settings=settings)
        assert sorted(rep.indexed) == ["sku-1", "sku-8"]
        rj.delete_from_targets(["sku-2"], index=ix_a, versions=[5], settings=settings, model_id="a@1")
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
    assert '"serving": "b@1"' in (settings.index_dir / POINTER_FILE).read_text()
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
    settings, mgr, models, fetcher = env
    fetcher.script["img/5"] = FetchError("missing", "gone from the object store")
    rep = rj.reembed(settings, "b", progress=False, manager=mgr)
    assert [(f.item_id, f.reason) for f in rep.failures] == [("sku-5", "missing")]
    assert rep.missing == ["sku-5"] and not rep.switched and rep.repaired == 1
    assert (mgr.serving(), mgr.building()) == ("a@1", "b@1")
    with mgr.opened("b@1") as ix_b:
        assert ix_b.count() == 7  # the rest of its batch and of the catalog went in

    # Re-running resumes (nothing re-embedded), and an operator may accept the gap.
    calls = models["b"].calls
    rep = rj.reembed(settings, "b", progress=False, manager=mgr, allow_missing=1)
    assert rep.switched and rep.missing == ["sku-5"] and rep.already == 7 and rep.indexed == 0
    assert models["b"].calls == calls  # only sku-5's failed attempts: no embedding at all
    assert mgr.serving() == "b@1"


def test_via_celery_task_path(env, monkeypatch) -> None:
    """The tongkuan.reembed_batch task through the worker app (eagerly: same process)."""
    settings, mgr, models, fetcher = env
    monkeypatch.setattr(rj, "get_settings", lambda: settings)  # the task reads the process settings
    eager = app.conf.task_always_eager
    app.conf.task_always_eager = True  # (celery's conf does not survive monkeypatch's undo)
    try:
        rep = rj.reembed(settings, "b", via_celery=True, progress=False, manager=mgr)
    finally:
        app.conf.task_always_eager = eager
    assert rep.switched and rep.indexed == 8 and rep.target_count == 8
    assert rj.REEMBED_TASK in app.tasks


def test_stale_task_writes_nothing_and_edge_refuses_real_celery(env) -> None:
    settings, mgr, models, fetcher = env
    out = rj.reembed_items([item(0)], settings=settings, model_name="b", manager=mgr)
    assert out["skipped"] == ["sku-0"] and out["indexed"] == []  # b is not being built
    from index.generations import GenerationError

    with pytest.raises(GenerationError, match="qdrant"):
        rj.reembed(settings, "b", via_celery=True, progress=False, manager=mgr)


def test_cli_status_and_model(env, monkeypatch, capsys) -> None:
    settings, mgr, models, fetcher = env
    monkeypatch.setattr(rj, "get_settings", lambda: settings)
    monkeypatch.setattr("vision.registry.ModelRegistry.set_active", lambda self, name: None)
    assert rj.main(["--status"]) == 0
    assert '"serving": "a@1"' in capsys.readouterr().out
    assert rj.main(["--model", "b"]) == 0
    assert '"switched": true' in capsys.readouterr().out
    assert rj.main(["--rollback"]) == 0 and mgr.serving() == "a@1"
