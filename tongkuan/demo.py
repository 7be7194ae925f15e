"""``make demo``: the main job on the embedded default, end to end, printing what it does."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from tongkuan.settings import Settings


def run_demo(data: str | Path, *, settings: Settings, n_queries: int = 6) -> int:
    from index.factory import open_index
    from query.searcher import Searcher
    from tongkuan.datasets import GroceryDataset
    from tongkuan.evaluate import evaluate, format_table
    from vision.runtime import VisionPipeline
    from workers.catalog import read_catalog
    from workers.fetch import ImageFetcher
    from workers.pipeline import ingest_stream

    ds = GroceryDataset(data)
    settings = settings.model_copy(update={"data_dir": settings.data_dir / "demo", "index_backend": "edge"})
    shutil.rmtree(settings.data_dir, ignore_errors=True)

    print("== 1. model")
    vision = VisionPipeline.from_settings(settings)
    print(f"   serving {vision.model_id} ({vision.dim}-d) on ONNX Runtime")

    print(f"== 2. ingest the catalog: {ds.catalog_dir}")
    t0 = time.perf_counter()
    index = open_index(settings, vision.dim, model_id=vision.model_id)
    rows = list(read_catalog(ds.catalog_dir))
    report = ingest_stream(rows, index=index, embedder=vision, fetcher=ImageFetcher.from_settings(settings),
                           max_pixels=settings.max_image_pixels, batch_size=settings.ingest_batch_size)
    dt = time.perf_counter() - t0
    print(f"   {len(report.indexed)} products indexed in {dt:.1f} s into {settings.index_dir} "
          f"(shards: {', '.join(f'{s}={index.count(s)}' for s in index.shards())}); "
          f"{len(report.failures)} failed, {len(report.duplicates)} duplicates linked")

    print(f"== 3. search {n_queries} shop photos from val (top 5)")
    photos = ds.split("val")
    step = max(1, len(photos) // n_queries)
    searcher = Searcher(index, vision, max_image_bytes=settings.max_image_bytes,
                        max_image_pixels=settings.max_image_pixels)
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

    print("== 4. catalog change events, applied in process by the Celery task's own function")
    _events_demo(rows, index, vision, settings)
    index.close()

    print("== 5. val metrics (production ingest + query code on a fresh index)")
    metrics = evaluate(data, "val", settings=settings, vision=vision, progress=True)
    print(format_table(metrics))
    return 0


def _events_demo(rows, index, vision, settings: Settings) -> None:
    """An edit, a late stale edit, a delete and a poison event through ``workers.tasks.apply_events``
    (what the Celery worker runs), with an in-memory bus standing in for Kafka's dead-letter topic."""
    from events.bus import InMemoryBus
    from events.models import ItemDeleted, ItemUpserted
    from events.topics import CATALOG_ITEMS_DLQ
    from workers.fetch import ImageFetcher
    from workers.tasks import WorkerRuntime, apply_events

    bus = InMemoryBus()
    runtime = WorkerRuntime(settings=settings, embedder=vision, index=index,
                            fetcher=ImageFetcher.from_settings(settings), dead_letters=bus.producer(),
                            dlq_topic=CATALOG_ITEMS_DLQ)
    a, b = rows[0], rows[1]
    edit = ItemUpserted(item_id=a.item_id, version=2, title=a.title + " (new pack)",
                        category_path=a.category_path, images=(a.image,))
    stale = ItemUpserted(item_id=a.item_id, version=1, title="an older edit arriving late",
                         category_path=a.category_path, images=(a.image,))
    delete = ItemDeleted(item_id=b.item_id, version=1)
    poison = ItemUpserted(item_id="poison-1", version=1, title="Private address", category_path=("Fruit",),
                          images=("http://169.254.169.254/latest/meta-data/x.jpg",))
    events = [e.model_dump(mode="json") for e in (edit, delete, poison)]
    events.append({"schema_version": 99, "type": "item_upserted", "item_id": "poison-2"})
    out = apply_events(events, runtime)
    late = apply_events([stale.model_dump(mode="json")], runtime)  # a later batch: the index guards it
    title = index.retrieve([a.item_id])[0].payload["title"]
    print(f"   edit v2 of {a.item_id}: title now {title!r}; the late v1 edit after it: "
          f"{'skipped as stale' if late.stale == [a.item_id] else 'APPLIED'}")
    print(f"   delete v1 of {b.item_id}: {'gone' if not index.retrieve([b.item_id]) else 'STILL THERE'} "
          f"(index holds {index.count()} items)")
    for d in out.dead_lettered:
        print(f"   dead-lettered {d['item_id']}: {d['reason']}")
    print(f"   {len(bus.records(CATALOG_ITEMS_DLQ))} records on {CATALOG_ITEMS_DLQ}; "
          f"indexed {out.indexed}, deleted {out.deleted}")
