"""The catalog-side pipeline as plain functions: fetch → hash/dedup → localize+embed → upsert.

``ingest_items`` is what the Celery embed task, the CLI (``tongkuan ingest``) and the demo call. It
never raises for a bad item: each one becomes an ``ItemFailure`` with a reason code, and the rest of
the batch goes on. Writes are version-guarded by the index, so re-running a batch is harmless.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from PIL import Image

from events.item import CatalogItem, ItemFailure
from index.base import IndexPoint, VectorIndex
from vision.decode import ImageError, decode_image
from workers.dedup import NEAR_DUP_MAX_BITS, NEAR_DUP_MIN_COSINE, dhash_hex, md5_hex, trim_background
from workers.fetch import FetchError, ImageFetcher

log = logging.getLogger(__name__)

# How many nearest catalog neighbours are checked for a near-duplicate twin (dHash distance).
TWIN_CANDIDATES = 5


class CatalogEmbedder(Protocol):
    """What the pipeline needs from the vision runtime (``vision.runtime.VisionPipeline``).

    Optionally also ``catalog_tensors(images) -> inputs | None`` and ``embed_catalog_tensors(inputs)``
    (the same embedding split into its CPU pre-processing and the model run): with several streams
    each stream pre-processes its own chunk before its model run. Or ``embed_chunks(chunks,
    max_pixels)``, which takes whole chunks from fetch to vectors elsewhere
    (``workers.embed_pool.PooledEmbedder``)."""

    model_id: str
    dim: int

    def embed_catalog(self, images: Sequence[Image.Image], batch_size: int = 32) -> np.ndarray: ...


@dataclass
class IngestReport:
    indexed: list[str] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    failures: list[ItemFailure] = field(default_factory=list)
    # item id -> id of the already indexed item it duplicates (exact MD5 or near dHash)
    duplicates: dict[str, str] = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)

    def merge(self, other: IngestReport) -> None:
        self.indexed += other.indexed
        self.stale += other.stale
        self.deleted += other.deleted
        self.failures += other.failures
        self.duplicates.update(other.duplicates)
        for k, v in other.stage_seconds.items():
            self.stage_seconds[k] = self.stage_seconds.get(k, 0.0) + v


@dataclass
class _Prepared:
    item: CatalogItem
    image: Image.Image | None  # None once embedded in another process (workers.embed_pool)
    md5: str
    dhash: str


class _Stopwatch:
    def __init__(self, into: dict[str, float]):
        self.into = into

    def __call__(self, stage: str):
        return _Stage(self.into, stage)


class _Stage:
    def __init__(self, into: dict[str, float], stage: str):
        self.into, self.stage = into, stage

    def __enter__(self):
        self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        self.into[self.stage] = self.into.get(self.stage, 0.0) + time.perf_counter() - self.t0


def ingest_items(
    items: Sequence[CatalogItem],
    *,
    index: VectorIndex,
    embedder: CatalogEmbedder,
    fetcher: ImageFetcher,
    max_pixels: int = 40_000_000,
    batch_size: int = 32,
    streams: int = 1,
    prefetch: bool = True,
) -> IngestReport:
    """Index one batch of items. Fetch/decode failures are reported per item; the rest are indexed.
    ``streams`` > 1: that many chunks of ``batch_size`` go through fetch → embed concurrently.
    ``prefetch`` (one stream): fetch and decode the next chunk on a helper thread while the model
    runs this one; turn it off where other calls run at the same time and keep the cores busy
    anyway (the worker's threads pool), so that the helper threads do not crowd them."""
    report = IngestReport()
    timer = _Stopwatch(report.stage_seconds)
    items = _latest_per_item(items)

    with timer("version_check"):
        stored = index.stored_versions([it.item_id for it in items])
    fresh: list[CatalogItem] = []
    for it in items:
        if it.item_id in stored and stored[it.item_id] > it.version:
            report.stale.append(it.item_id)
        else:
            fresh.append(it)

    chunks = [fresh[i : i + batch_size] for i in range(0, len(fresh), batch_size)]
    prepared: list[_Prepared] = []
    parts: list[np.ndarray] = []
    for ready, vectors, failures, seconds in _embed_chunks(chunks, fetcher, max_pixels, embedder,
                                                           batch_size, streams, prefetch):
        report.failures += failures
        for stage, sec in seconds.items():
            report.stage_seconds[stage] = report.stage_seconds.get(stage, 0.0) + sec
        if ready:
            prepared += ready
            parts.append(vectors)
    if not prepared:
        return report
    vectors = np.concatenate(parts)

    with timer("dedup"):
        twins = _find_twins(prepared, vectors, index)
    report.duplicates.update(twins)

    points = [
        IndexPoint(
            item_id=p.item.item_id,
            shard=p.item.shard,
            vector=vectors[i],
            version=p.item.version,
            payload=item_payload(p.item, md5=p.md5, dhash=p.dhash, model_id=embedder.model_id,
                                 duplicate_of=twins.get(p.item.item_id)),
        )
        for i, p in enumerate(prepared)
    ]
    with timer("upsert"):
        result = index.upsert(points)
    report.indexed += result.applied
    report.stale += result.stale
    return report


def _embed_chunks(
    chunks: Sequence[Sequence[CatalogItem]], fetcher: ImageFetcher, max_pixels: int,
    embedder: CatalogEmbedder, batch_size: int, streams: int, prefetch: bool = True,
) -> Iterator[tuple[list[_Prepared], np.ndarray | None, list[ItemFailure], dict[str, float]]]:
    """(prepared items, their vectors, failures, stage seconds) per chunk, in chunk order.

    One stream: the next chunk is fetched, decoded and hashed on a helper thread while ONNX Runtime
    runs the current one (PIL and ORT release the GIL). Pre-processing stays next to the model run:
    on the helper thread it took a core from ORT's intra-op pool, whose every op then waits for its
    slowest thread (make bench-ingest: 91.6 -> 87.5 items/s). Without ``prefetch``, each chunk is
    prepared and then embedded on the calling thread: with other calls running at once, their model
    runs fill the cores meanwhile (in process, 3 calls at once: 0.88-0.91 of the model-only rate
    without the helper threads, 0.87-0.89 with them). Several streams: that many chunks run the
    whole way concurrently, each model run single-threaded on its share of the cores."""
    if not chunks:
        return
    if (elsewhere := getattr(embedder, "embed_chunks", None)) is not None:
        # whole chunks in the embedding processes (workers.embed_pool); this process writes
        yield from elsewhere(chunks, max_pixels)
        return

    def embed(ready: list[_Prepared], tensors: Any, seconds: dict[str, float]) -> np.ndarray | None:
        return embed_prepared(embedder, ready, tensors, seconds, batch_size)

    if streams > 1:
        def whole(chunk: Sequence[CatalogItem]):
            ready, tensors, failures, seconds = prepare_chunk(chunk, fetcher, max_pixels, embedder, tensors=True)
            return ready, embed(ready, tensors, seconds), failures, seconds

        with ThreadPoolExecutor(streams, thread_name_prefix="ingest-stream") as pool:
            yield from pool.map(whole, chunks)
        return

    if not prefetch:
        for chunk in chunks:
            ready, tensors, failures, seconds = prepare_chunk(chunk, fetcher, max_pixels, embedder)
            yield ready, embed(ready, tensors, seconds), failures, seconds
        return

    with ThreadPoolExecutor(1, thread_name_prefix="ingest-prepare") as pool:
        pending = pool.submit(prepare_chunk, chunks[0], fetcher, max_pixels, embedder)
        for n in range(len(chunks)):
            ready, tensors, failures, seconds = pending.result()
            if n + 1 < len(chunks):
                pending = pool.submit(prepare_chunk, chunks[n + 1], fetcher, max_pixels, embedder)
            yield ready, embed(ready, tensors, seconds), failures, seconds


def embed_prepared(embedder: CatalogEmbedder, ready: list[_Prepared], tensors: Any, seconds: dict[str, float],
                   batch_size: int) -> np.ndarray | None:
    """The vectors of a prepared chunk (from ``tensors`` when ``prepare_chunk`` made them), timed
    as the ``embed`` stage; None for an empty chunk."""
    if not ready:
        return None
    with _Stopwatch(seconds)("embed"):
        if tensors is not None:
            return embedder.embed_catalog_tensors(tensors)
        return embedder.embed_catalog([p.image for p in ready], batch_size=batch_size)


def prepare_chunk(
    items: Sequence[CatalogItem], fetcher: ImageFetcher, max_pixels: int, embedder: CatalogEmbedder,
    *, tensors: bool = False,
) -> tuple[list[_Prepared], Any, list[ItemFailure], dict[str, float]]:
    """Fetch, decode, hash and (``tensors`` and the embedder offers it) pre-process some items:
    (prepared, model inputs or None, per-item failures, stage seconds)."""
    seconds: dict[str, float] = {}
    timer = _Stopwatch(seconds)
    prepared: list[_Prepared] = []
    failures: list[ItemFailure] = []
    for it in items:
        try:
            with timer("fetch"):
                data = fetcher.fetch(it.image)
            with timer("decode"):
                image = decode_image(data, max_bytes=fetcher.max_bytes, max_pixels=max_pixels)
            with timer("hash"):
                prepared.append(_Prepared(it, image, md5_hex(data), dhash_hex(trim_background(image))))
        except (FetchError, ImageError) as e:
            failures.append(ItemFailure(item_id=it.item_id, reason=e.reason, detail=e.detail))
    inputs = None
    to_tensors = getattr(embedder, "catalog_tensors", None) if tensors else None
    if prepared and to_tensors is not None:
        with timer("preprocess"):
            inputs = to_tensors([p.image for p in prepared])
    return prepared, inputs, failures, seconds


def item_payload(
    item: CatalogItem, *, md5: str, dhash: str, model_id: str, duplicate_of: str | None
) -> dict:
    payload = {
        "item_id": item.item_id,
        "version": item.version,
        "title": item.title,
        "category_path": list(item.category_path),
        "category": item.coarse_category,
        "image": item.image,
        "md5": md5,
        "dhash": dhash,
        "model_id": model_id,
        "indexed_at": time.time(),
    }
    if item.price is not None:
        payload["price"] = item.price
    if item.shop is not None:
        payload["shop"] = item.shop
    if duplicate_of is not None:
        payload["duplicate_of"] = duplicate_of
    return payload


def _latest_per_item(items: Sequence[CatalogItem]) -> list[CatalogItem]:
    """Within one batch only the highest version of an item matters (first seen wins a tie)."""
    best: dict[str, CatalogItem] = {}
    for it in items:
        cur = best.get(it.item_id)
        if cur is None or it.version > cur.version:
            best[it.item_id] = it
    return list(best.values())


def _find_twins(prepared: Sequence[_Prepared], vectors: np.ndarray, index: VectorIndex) -> dict[str, str]:
    """Link each new item to an indexed (or earlier in-batch) item with the same bytes (MD5), or with
    a near-identical picture: dHash within NEAR_DUP_MAX_BITS bits *and* embeddings at cosine
    >= NEAR_DUP_MIN_COSINE (the hash alone confuses packshots on the same white background). Twins
    are still indexed; the query side collapses them. Candidates are the item's nearest neighbours in
    its own shard, since a near-duplicate picture is also a near neighbour in embedding space."""
    twins: dict[str, str] = {}
    seen: list[tuple[str, int]] = []  # (group root, row in prepared/vectors)

    def near(md5_a: str, hash_a: int, md5_b: str | None, hash_b: int | None, cosine: float) -> bool:
        if md5_a == md5_b:
            return True
        return hash_b is not None and (hash_a ^ hash_b).bit_count() <= NEAR_DUP_MAX_BITS and cosine >= NEAR_DUP_MIN_COSINE

    # Every item's indexed neighbours up front, one batch query per shard (the index does not
    # change during this loop: the batch is written after it).
    neighbours: dict[int, list] = {}
    by_shard: dict[str, list[int]] = {}
    for i, p in enumerate(prepared):
        by_shard.setdefault(p.item.shard, []).append(i)
    for shard, rows in by_shard.items():
        for i, hits in zip(rows, index.search_batch(vectors[rows], limit=TWIN_CANDIDATES, shards=[shard]),
                           strict=True):
            neighbours[i] = hits

    # In-batch pairs: one similarity matrix and integer hashes (this loop is O(batch²) pairs, so
    # each pair must cost a comparison, not a numpy call).
    sims = vectors @ vectors.T
    hashes = [int(p.dhash, 16) for p in prepared]
    for i, p in enumerate(prepared):
        me = p.item.item_id
        twin = None
        for root, j in seen:
            if near(p.md5, hashes[i], prepared[j].md5, hashes[j], sims[i, j]):
                twin = root
                break
        if twin is None:
            for hit in neighbours[i]:
                other = hit.payload
                theirs = int(other["dhash"], 16) if other.get("dhash") else None
                if hit.item_id != me and near(p.md5, hashes[i], other.get("md5"), theirs, hit.score):
                    twin = other.get("duplicate_of") or hit.item_id
                    break
        if twin is not None and twin != me:
            twins[me] = twin
        seen.append((twins.get(me, me), i))  # link to the group's first item, never to a twin
    return twins


def delete_items(
    item_ids: Sequence[str], *, index: VectorIndex, versions: Sequence[int] | None = None
) -> IngestReport:
    report = IngestReport()
    result = index.delete(list(item_ids), versions)
    report.deleted += result.applied
    report.stale += result.stale
    return report


def ingest_stream(
    rows: Iterable[CatalogItem | ItemFailure],
    *,
    index: VectorIndex,
    embedder: CatalogEmbedder,
    fetcher: ImageFetcher,
    max_pixels: int = 40_000_000,
    batch_size: int = 32,
    on_batch: Callable[[IngestReport, int], None] | None = None,
) -> IngestReport:
    """Ingest a whole catalog in batches (``read_catalog`` output: items and bad rows)."""
    total = IngestReport()
    batch: list[CatalogItem] = []

    def flush() -> None:
        if not batch:
            return
        part = ingest_items(batch, index=index, embedder=embedder, fetcher=fetcher,
                            max_pixels=max_pixels, batch_size=batch_size)
        total.merge(part)
        if on_batch is not None:
            on_batch(part, len(batch))
        batch.clear()

    for row in rows:
        if isinstance(row, ItemFailure):
            total.failures.append(row)
            if on_batch is not None:
                on_batch(IngestReport(failures=[row]), 1)
            continue
        batch.append(row)
        if len(batch) >= batch_size:
            flush()
    flush()
    # Qdrant Edge has no background optimizer: new points are searched by brute force until the
    # HNSW graph (and quantized copies) are built, so a bulk load ends with an explicit optimize.
    index.optimize()
    index.flush()
    return total
