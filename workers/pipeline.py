"""The catalog-side pipeline as plain functions: fetch → hash → embed → link twins → upsert.

``ingest(items, targets=..., embedding=...)`` is what the worker's batch runs: each picture is
fetched, decoded and hashed once, embedded once per target model, and written (twin check, then
version-guarded upsert) into every target generation (``index.targets``). ``ingest_items`` is the
same for one index and one model: the CLI (``tongkuan ingest``), the demo, the evaluation and the
re-embed call it.

A bad item never raises: it becomes an ``ItemFailure`` with a reason code, and the rest of the
batch goes on. Writes are version-guarded by the index, so re-running a batch is harmless. Items
must be unique per call (``events.contract.coalesce`` / ``latest_items`` decide which one stays).
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

from events.contract import latest_items
from events.item import CatalogItem, ItemFailure
from index.base import IndexPoint, VectorIndex
from index.targets import ModelRef, WriteTarget
from vision.decode import ImageError, decode_image
from workers import metrics
from workers.dedup import dhash_hex, md5_hex, trim_background
from workers.fetch import FetchError, ImageFetcher
from workers.twins import find_twins

log = logging.getLogger(__name__)


class CatalogEmbedder(Protocol):
    """What the pipeline needs from a model (``vision.runtime.VisionPipeline``,
    ``vision.thumbnail.ThumbnailEmbedder``). Optionally also ``catalog_tensors(images)`` and
    ``embed_catalog_tensors(inputs)``: the same embedding split into its CPU pre-processing and the
    model run, so that several streams each pre-process their own chunk."""

    model_id: str
    dim: int

    def embed_catalog(self, images: Sequence[Image.Image], batch_size: int = 32) -> np.ndarray: ...


@dataclass
class Prepared:
    item: CatalogItem
    image: Image.Image | None  # None once embedded in another process (workers.embed_pool)
    md5: str
    dhash: str


# One chunk: (items ready, with their hashes; their vectors per model id; failures; stage seconds)
ChunkResult = tuple[list[Prepared], dict[str, np.ndarray], list[ItemFailure], dict[str, float]]


class ChunkEmbedder(Protocol):
    """Fetch → decode → hash → embed for chunks of items, for several models at once: in this
    process (``LocalEmbedding``) or in embedding processes (``workers.embed_pool.EmbedPool``)."""

    def embed_chunks(self, chunks: Sequence[Sequence[CatalogItem]], models: Sequence[ModelRef]) -> Iterator[ChunkResult]: ...


class TargetWriteError(RuntimeError):
    """A required target generation could not be written: the batch fails (and is retried)."""


@dataclass
class TargetOutcome:
    indexed: list[str] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)
    error: str | None = None


@dataclass
class IngestReport:
    """What happened, as seen by the first (serving) target; ``targets`` has every target's part."""

    indexed: list[str] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    failures: list[ItemFailure] = field(default_factory=list)
    # item id -> id of the already indexed item it duplicates (exact MD5 or near dHash)
    duplicates: dict[str, str] = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    targets: dict[str, TargetOutcome] = field(default_factory=dict)

    def merge(self, other: IngestReport) -> None:
        self.indexed += other.indexed
        self.stale += other.stale
        self.deleted += other.deleted
        self.failures += other.failures
        self.duplicates.update(other.duplicates)
        for k, v in other.stage_seconds.items():
            self.stage_seconds[k] = self.stage_seconds.get(k, 0.0) + v


class Stopwatch:
    """``with timer("stage"):`` adds the block's wall time to ``into[stage]``."""

    def __init__(self, into: dict[str, float]):
        self.into = into
        self._stage = ""

    def __call__(self, stage: str) -> Stopwatch:
        self._stage = stage
        return self

    def __enter__(self) -> None:
        self._t0 = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.into[self._stage] = self.into.get(self._stage, 0.0) + time.perf_counter() - self._t0


# --- fetch, decode, hash, embed --------------------------------------------------------------------

def prepare_chunk(items: Sequence[CatalogItem], fetcher: ImageFetcher, max_pixels: int,
                  ) -> tuple[list[Prepared], list[ItemFailure], dict[str, float]]:
    """Fetch, decode and hash some items: (prepared, per-item failures, stage seconds)."""
    seconds: dict[str, float] = {}
    timer = Stopwatch(seconds)
    prepared: list[Prepared] = []
    failures: list[ItemFailure] = []
    for it in items:
        try:
            with timer("fetch"):
                data = fetcher.fetch(it.image)
            with timer("decode"):
                image = decode_image(data, max_bytes=fetcher.max_bytes, max_pixels=max_pixels)
            with timer("hash"):
                prepared.append(Prepared(it, image, md5_hex(data), dhash_hex(trim_background(image))))
        except (FetchError, ImageError) as e:
            failures.append(ItemFailure(item_id=it.item_id, reason=e.reason, detail=e.detail))
    return prepared, failures, seconds


def embed_prepared(prepared: list[Prepared], embedders: Sequence[CatalogEmbedder], seconds: dict[str, float],
                   batch_size: int) -> dict[str, np.ndarray]:
    """The vectors of a prepared chunk per model id (pre-processing timed as ``preprocess`` where
    the model splits it off, the model runs as ``embed``)."""
    out: dict[str, np.ndarray] = {}
    if not prepared:
        return out
    timer = Stopwatch(seconds)
    images = [p.image for p in prepared]
    for embedder in embedders:
        to_tensors = getattr(embedder, "catalog_tensors", None)
        tensors = None
        if to_tensors is not None:
            with timer("preprocess"):
                tensors = to_tensors(images)
        with timer("embed"):
            out[embedder.model_id] = (embedder.embed_catalog_tensors(tensors) if tensors is not None
                                      else embedder.embed_catalog(images, batch_size=batch_size))
    return out


class LocalEmbedding:
    """``ChunkEmbedder`` in this process. ``load(model)`` gives a model's embedder (cached by the
    caller). One stream: the next chunk is fetched, decoded and hashed on a helper thread while ORT
    runs this one (``prefetch``; turn it off where other calls keep the cores busy anyway: the
    worker's threads pool). Several streams: that many chunks go the whole way concurrently."""

    def __init__(self, fetcher: ImageFetcher, load: Callable[[ModelRef], CatalogEmbedder], *,
                 max_pixels: int = 40_000_000, batch_size: int = 32, streams: int = 1, prefetch: bool = True):
        self.fetcher, self.load = fetcher, load
        self.max_pixels, self.batch_size, self.streams, self.prefetch = max_pixels, batch_size, streams, prefetch

    @classmethod
    def single(cls, embedder: CatalogEmbedder, fetcher: ImageFetcher, **kw: Any) -> LocalEmbedding:
        """For one model only (the CLI, the demo, the evaluation)."""
        def load(model: ModelRef) -> CatalogEmbedder:
            if model.model_id != embedder.model_id:
                raise ValueError(f"this embedding runs {embedder.model_id}, not {model.model_id}")
            return embedder

        return cls(fetcher, load, **kw)

    def embed_chunks(self, chunks: Sequence[Sequence[CatalogItem]], models: Sequence[ModelRef]) -> Iterator[ChunkResult]:
        if not chunks:
            return
        embedders = [self._checked(m) for m in models]

        def whole(chunk: Sequence[CatalogItem]) -> ChunkResult:
            ready, failures, seconds = prepare_chunk(chunk, self.fetcher, self.max_pixels)
            return ready, embed_prepared(ready, embedders, seconds, self.batch_size), failures, seconds

        if self.streams > 1:
            with ThreadPoolExecutor(self.streams, thread_name_prefix="ingest-stream") as pool:
                yield from pool.map(whole, chunks)
            return
        if not self.prefetch:
            for chunk in chunks:
                yield whole(chunk)
            return
        with ThreadPoolExecutor(1, thread_name_prefix="ingest-prepare") as pool:
            pending = pool.submit(prepare_chunk, chunks[0], self.fetcher, self.max_pixels)
            for n in range(len(chunks)):
                ready, failures, seconds = pending.result()
                if n + 1 < len(chunks):
                    pending = pool.submit(prepare_chunk, chunks[n + 1], self.fetcher, self.max_pixels)
                yield ready, embed_prepared(ready, embedders, seconds, self.batch_size), failures, seconds

    def _checked(self, model: ModelRef) -> CatalogEmbedder:
        embedder = self.load(model)
        if embedder.model_id != model.model_id:
            raise TargetWriteError(f"model {model.name!r} loads as {embedder.model_id}, its generation is "
                                   f"{model.model_id}: one index never mixes two models")
        return embedder


# --- write -------------------------------------------------------------------------------------------

def ingest(items: Sequence[CatalogItem], *, targets: Sequence[WriteTarget], embedding: ChunkEmbedder,
           batch_size: int = 32) -> IngestReport:
    """Index one batch of unique items into every target. Per-item failures (fetch, decode) are
    shared by all targets; a required target that cannot be written raises ``TargetWriteError``,
    an optional one is counted (``tongkuan_ingest_target_write_failures_total``) and reported."""
    if len({it.item_id for it in items}) != len(items):
        raise ValueError("ingest takes one entry per item id (coalesce first)")
    report = IngestReport()
    if not targets:
        raise TargetWriteError("no target generation to write to")
    timer = Stopwatch(report.stage_seconds)
    with timer("version_check"):
        stored = [t.index.stored_versions([it.item_id for it in items]) for t in targets]

    def is_stale(n: int, it: CatalogItem) -> bool:
        return stored[n].get(it.item_id, -1) > it.version

    # Fetched and embedded once if any target still needs it.
    fresh = [it for it in items if not all(is_stale(n, it) for n in range(len(targets)))]
    chunks = [fresh[i: i + batch_size] for i in range(0, len(fresh), batch_size)]
    prepared: list[Prepared] = []
    parts: dict[str, list[np.ndarray]] = {t.model_id: [] for t in targets}
    for ready, vectors, failures, seconds in embedding.embed_chunks(chunks, [t.model for t in targets]):
        report.failures += failures
        for stage, sec in seconds.items():
            report.stage_seconds[stage] = report.stage_seconds.get(stage, 0.0) + sec
        if ready:
            prepared += ready
            for model_id, part in parts.items():
                part.append(vectors[model_id])
    for n, target in enumerate(targets):
        outcome = TargetOutcome(stale=[it.item_id for it in items if is_stale(n, it)])
        report.targets[target.model_id] = outcome
        rows = [i for i, p in enumerate(prepared) if not is_stale(n, p.item)]
        if not rows:
            continue
        vectors = np.concatenate(parts[target.model_id])[rows]
        try:
            twins = _write(target, [prepared[i] for i in rows], vectors, report.stage_seconds, outcome)
        except Exception as e:  # noqa: BLE001 - the policy below decides: fail the batch or count it
            _target_failed(target, e, outcome)
            continue
        if n == 0:
            report.duplicates.update(twins)
    first = report.targets[targets[0].model_id]
    report.indexed, report.stale = first.indexed, first.stale
    return report


def _write(target: WriteTarget, prepared: list[Prepared], vectors: np.ndarray, seconds: dict[str, float],
           outcome: TargetOutcome) -> dict[str, str]:
    timer = Stopwatch(seconds)
    with timer("dedup"):
        twins = find_twins(prepared, vectors, target.index)
    points = [IndexPoint(item_id=p.item.item_id, shard=p.item.shard, vector=vectors[i], version=p.item.version,
                         payload=item_payload(p.item, md5=p.md5, dhash=p.dhash, model_id=target.model_id,
                                              duplicate_of=twins.get(p.item.item_id)))
              for i, p in enumerate(prepared)]
    with timer("upsert"):
        result = target.index.upsert(points)
    outcome.indexed += result.applied
    outcome.stale += result.stale
    return twins


def _target_failed(target: WriteTarget, error: Exception, outcome: TargetOutcome) -> None:
    outcome.error = f"{type(error).__name__}: {error}"
    metrics.TARGET_WRITE_FAILURES.labels(role=target.role).inc()
    if target.required:
        raise TargetWriteError(f"{target.role} generation {target.model_id}: {outcome.error}") from error
    log.warning("write to the %s generation %s failed (optional): %s", target.role, target.model_id, outcome.error)


def delete(item_ids: Sequence[str], *, targets: Sequence[WriteTarget],
           versions: Sequence[int] | None = None) -> IngestReport:
    """Delete (tombstone) items in every target, with the same failure policy as ``ingest``."""
    report = IngestReport()
    for n, target in enumerate(targets):
        outcome = TargetOutcome()
        report.targets[target.model_id] = outcome
        try:
            result = target.index.delete(list(item_ids), versions)
        except Exception as e:  # noqa: BLE001
            _target_failed(target, e, outcome)
            continue
        outcome.indexed, outcome.stale = result.applied, result.stale
        if n == 0:
            report.deleted, report.stale = result.applied, result.stale
    return report


def item_payload(item: CatalogItem, *, md5: str, dhash: str, model_id: str, duplicate_of: str | None) -> dict:
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


# --- one index, one model ---------------------------------------------------------------------------

def single_target(index: VectorIndex, embedder: CatalogEmbedder, name: str = "") -> list[WriteTarget]:
    """One serving target; ``name``: the model's registry name (what embedding processes load)."""
    return [WriteTarget(ModelRef(name or embedder.model_id, embedder.model_id), index)]


def ingest_items(items: Sequence[CatalogItem], *, index: VectorIndex, embedder: CatalogEmbedder,
                 fetcher: ImageFetcher, max_pixels: int = 40_000_000, batch_size: int = 32, streams: int = 1,
                 prefetch: bool = True) -> IngestReport:
    """``ingest`` into one index with one model; several rows of one item: ``latest_items`` decides."""
    embedding = LocalEmbedding.single(embedder, fetcher, max_pixels=max_pixels, batch_size=batch_size,
                                      streams=streams, prefetch=prefetch)
    return ingest(latest_items(items), targets=single_target(index, embedder), embedding=embedding,
                  batch_size=batch_size)


def delete_items(item_ids: Sequence[str], *, index: VectorIndex, versions: Sequence[int] | None = None
                 ) -> IngestReport:
    result = index.delete(list(item_ids), versions)
    return IngestReport(deleted=result.applied, stale=result.stale)


def ingest_stream(rows: Iterable[CatalogItem | ItemFailure], *, index: VectorIndex, embedder: CatalogEmbedder,
                  fetcher: ImageFetcher, max_pixels: int = 40_000_000, batch_size: int = 32,
                  on_batch: Callable[[IngestReport, int], None] | None = None) -> IngestReport:
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
