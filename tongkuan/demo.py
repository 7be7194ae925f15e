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
    index.close()

    print("== 4. val metrics (production ingest + query code on a fresh index)")
    metrics = evaluate(data, "val", settings=settings, vision=vision, progress=True)
    print(format_table(metrics))
    return 0
