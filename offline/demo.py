"""``make demo``: the main job on the embedded default, end to end, printing what it does.

1. load the served model; 2. ingest the grocery catalog into a fresh embedded index; 3. search shop
photos of the val split; 4. send catalog change events (an edit, a late stale edit, a delete, a
feature update, poison) through the embedded event path (``tongkuan.embedded``: the dispatcher and
the ingest task's own code on the in-memory bus); 5. the val metrics on a fresh index.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from offline.datasets import DEFAULT_DATA, REPO_ROOT, GroceryDataset
from tongkuan.config import ToolConfig, load

DEMO_DIR = REPO_ROOT / "var" / "demo"


def run_demo(data: str | Path, *, cfg: ToolConfig, n_queries: int = 6, work: Path = DEMO_DIR) -> int:
    from events.bus import InMemoryBus
    from feature_store.settings import FeatureStoreSettings
    from feature_store.store import ItemFeatureStore
    from index.settings import EdgeIndexSettings
    from offline.evaluate import evaluate, format_table
    from query.searcher import Searcher
    from tongkuan.embedded import EmbeddedEvents
    from workers.catalog import read_catalog
    from workers.pipeline import ingest_stream
    from workers.runtime import build_runtime

    ds = GroceryDataset(data)
    shutil.rmtree(work, ignore_errors=True)
    index_settings = EdgeIndexSettings(dir=work / "index")

    print("== 1. model")
    rt = build_runtime(worker=cfg.worker, runtime=cfg.runtime, image=cfg.image, index=index_settings,
                       fetch=cfg.fetch.reading_files_under(ds.dir), dead_letters=InMemoryBus().producer())
    try:
        target = rt.targets.current()[0]
        vision = rt.load(target.model.name)
        index = target.index
        titles = rt.titles(target.model.text_model) if target.model.text_model and rt.titles else None
        print(f"   serving {vision.model_id} ({vision.dim}-d) on ONNX Runtime; title vectors: "
              f"{titles.model_id if titles else 'none'}")

        print(f"== 2. ingest the catalog: {ds.catalog_dir}")
        t0 = time.perf_counter()
        rows = list(read_catalog(ds.catalog_dir))
        report = ingest_stream(rows, index=index, embedder=vision, fetcher=rt.fetcher,
                               max_pixels=cfg.image.max_pixels, batch_size=cfg.worker.ingest_batch_size,
                               titles=titles)
        print(f"   {len(report.indexed)} products indexed in {time.perf_counter() - t0:.1f} s into "
              f"{index_settings.dir} (shards: {', '.join(f'{s}={index.count(s)}' for s in index.shards())}); "
              f"{len(report.failures)} failed, {len(report.duplicates)} duplicates linked")

        print(f"== 3. search {n_queries} shop photos from val (top 5)")
        searcher = Searcher.from_settings(index, vision, cfg.search, max_image_bytes=cfg.image.max_bytes,
                                          max_image_pixels=cfg.image.max_pixels, text_encoder=titles)
        _searches(ds, searcher, n_queries)
        if searcher.serves_text:
            for text in ("pink lady apple", "oat milk"):
                top = [f"{h.title} ({h.score:.2f})" for h in searcher.search_text(text, limit=3).hits]
                print(f"   text {text!r}: " + "; ".join(top))

        print("== 4. catalog change events through the embedded event path (dispatcher + the task's code)")
        store = ItemFeatureStore(FeatureStoreSettings(data_dir=work / "features"))
        events = EmbeddedEvents(rt, store)
        try:
            _events(events, rows, index)
        finally:
            events.close()
            store.close()
    finally:
        rt.close()

    print("== 5. val metrics (production ingest + query code on a fresh index)")
    metrics = evaluate(data, "val", cfg=cfg, vision=vision, progress=True)
    print(format_table(metrics))
    return 0


def _searches(ds: GroceryDataset, searcher, n_queries: int) -> None:
    photos = ds.split("val")
    step = max(1, len(photos) // n_queries)
    correct = 0
    picked = photos[::step][:n_queries]
    for ph in picked:
        truth = ds.by_fine[ph.fine_id]
        resp = searcher.search_bytes(ph.path.read_bytes(), limit=5)
        obj = resp.objects[0]
        ok = bool(obj.hits) and obj.hits[0].item_id == truth.item_id
        correct += ok
        cat = obj.category
        print(f"   {ph.rel}  [truth: {truth.name}]  {'RIGHT' if ok else 'wrong'} first; "
              f"category {cat.category if cat else '?'} ({cat.confidence:.2f}); "
              f"{sum(resp.timings_ms.values()):.0f} ms")
        for rank, h in enumerate(obj.hits, start=1):
            mark = "*" if h.item_id == truth.item_id else " "
            print(f"     {mark}{rank}. {h.score:.3f}  {h.title}  ({h.item_id})")
    print(f"   right product first for {correct}/{len(picked)} photos")


def _events(events, rows, index) -> None:
    import json
    import time

    from events.models import ItemDeleted, ItemFeaturesUpdated, ItemUpserted

    a, b = rows[0], rows[1]
    edit = ItemUpserted(item_id=a.item_id, version=2, title=a.title + " (new pack)",
                        category_path=a.category_path, images=(a.image,))
    stale = ItemUpserted(item_id=a.item_id, version=1, title="an older edit arriving late",
                         category_path=a.category_path, images=(a.image,))
    gone = ItemDeleted(item_id=b.item_id, version=1)
    # absolute counters: the first snapshot is the baseline, the window holds what came after it
    baseline = ItemFeaturesUpdated(item_id=a.item_id, event_time=time.time() - 3600,
                                   counters={"impressions": 100, "clicks": 5, "orders": 1})
    counters = ItemFeaturesUpdated(item_id=a.item_id, counters={"impressions": 120, "clicks": 9, "orders": 2})
    private = ItemUpserted(item_id="poison-1", version=1, title="Private address", category_path=("Fruit",),
                           images=("http://169.254.169.254/latest/meta-data/x.jpg",))
    events.publish([edit, gone, baseline, counters, private])
    events.publish_raw([("poison-2", json.dumps({"schema_version": 99, "type": "item_upserted",
                                                  "item_id": "poison-2"}).encode())])
    events.run_until_idle()
    events.publish([stale])  # a later batch: the index's version guard keeps v2
    events.run_until_idle()
    title = index.retrieve([a.item_id])[0].payload["title"]
    print(f"   edit v2 of {a.item_id}: title now {title!r}; the late v1 edit after it: "
          f"{'skipped as stale' if 'older' not in title else 'APPLIED'}")
    print(f"   delete v1 of {b.item_id}: {'gone' if not index.retrieve([b.item_id]) else 'STILL THERE'} "
          f"(index holds {index.count()} items)")
    online = events.feature_store.online([a.item_id]).get(a.item_id, {})
    shown = {k: online.get(k) for k in ("impressions_7d", "clicks_7d", "orders_7d", "ctr_7d")}
    print(f"   feature update of {a.item_id}: on catalog.features, not the embedder's topic; the feature store "
          f"(Feast, SQLite online) serves " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                                                        for k, v in shown.items()))
    for d in events.dead_letters():
        print(f"   dead-lettered {d.item_id or d.key}: {d.reason} (stage {d.stage}, from {d.source_topic}/"
              f"{d.source_partition}/{d.source_offset})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m offline demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--queries", type=int, default=6)
    args = ap.parse_args(argv)
    return run_demo(args.data, cfg=load(ToolConfig), n_queries=args.queries)


if __name__ == "__main__":
    raise SystemExit(main())
