"""The catalog-side pipeline as plain functions: fetch → hash → embed → link twins → upsert.

``ingest(items, targets=..., embedding=...)`` is what the worker's batch runs: each picture is
fetched, decoded and hashed once, embedded once per target model, and written (twin check, then
version-guarded upsert) into every target generation (``index.targets``). ``ingest_items`` is the
same for one index and one model: the CLI (``tongkuan ingest``), the demo, the evaluation and the
re-embed call it.

Fetching, decoding and embedding are ``workers.embedding``'s. A bad item never raises: it becomes
an ``ItemFailure`` with a reason code, and the rest of the batch goes on. Writes are version-guarded by the index, so re-running a batch is harmless. Items
must be unique per call (``events.contract.coalesce`` / ``latest_items`` decide which one stays).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from events.contract import latest_items
from events.item import CatalogItem, ItemFailure
from index.base import IndexPoint, VectorIndex
from index.targets import ModelRef, WriteTarget
from workers import metrics
from workers.embedding import CatalogEmbedder, ChunkEmbedder, LocalEmbedding, Prepared, Stopwatch
from workers.fetch import ImageFetcher
from workers.twins import find_twins

log = logging.getLogger(__name__)


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


# --- write -------------------------------------------------------------------------------------------

class TitleEmbedder(Protocol):
    """Titles -> (n, dim) L2-normalised vectors (``vision.text.TitleEncoder``)."""

    model_id: str
    dim: int

    def encode(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray: ...


# A target's text model id -> its title encoder (cached by the caller).
TitleLoader = Callable[[str], TitleEmbedder]


def ingest(items: Sequence[CatalogItem], *, targets: Sequence[WriteTarget], embedding: ChunkEmbedder,
           batch_size: int = 32, titles: TitleLoader | None = None) -> IngestReport:
    """Index one batch of unique items into every target. Per-item failures (fetch, decode) are
    shared by all targets; a required target that cannot be written raises ``TargetWriteError``,
    an optional one is counted (``tongkuan_ingest_target_write_failures_total``) and reported.
    ``titles``: the title encoders of targets whose generation holds title vectors (a target that
    holds them and gets none fails like any other write: its items would be unfindable by text)."""
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
            twins = _write(target, [prepared[i] for i in rows], vectors, report.stage_seconds, outcome, titles)
        except Exception as e:  # noqa: BLE001 - the policy below decides: fail the batch or count it
            _target_failed(target, e, outcome)
            continue
        if n == 0:
            report.duplicates.update(twins)
    first = report.targets[targets[0].model_id]
    report.indexed, report.stale = first.indexed, first.stale
    return report


def title_vectors(target: WriteTarget, prepared: Sequence[Prepared], titles: TitleLoader | None
                  ) -> np.ndarray | None:
    """The items' title vectors for ``target`` (None where its generation holds none)."""
    if not target.index.text_dim:
        return None
    model = target.model.text_model
    if titles is None or not model:
        raise TargetWriteError(f"generation {target.model_id} holds title vectors ({model or 'model unknown'}) "
                               f"but this writer has no title encoder for it")
    encoder = titles(model)
    if encoder.model_id != model or encoder.dim != target.index.text_dim:
        raise TargetWriteError(f"title encoder {encoder.model_id} ({encoder.dim}-d) is not the generation's "
                               f"{model} ({target.index.text_dim}-d)")
    return encoder.encode([p.item.title for p in prepared])


def _write(target: WriteTarget, prepared: list[Prepared], vectors: np.ndarray, seconds: dict[str, float],
           outcome: TargetOutcome, titles: TitleLoader | None = None) -> dict[str, str]:
    timer = Stopwatch(seconds)
    with timer("title"):
        title_vecs = title_vectors(target, prepared, titles)
    with timer("dedup"):
        twins = find_twins(prepared, vectors, target.index)
    points = [IndexPoint(item_id=p.item.item_id, shard=p.item.shard, vector=vectors[i], version=p.item.version,
                         payload=item_payload(p.item, md5=p.md5, dhash=p.dhash, model_id=target.model_id,
                                              duplicate_of=twins.get(p.item.item_id), public_image=p.public),
                         title_vector=None if title_vecs is None else title_vecs[i])
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


def item_payload(item: CatalogItem, *, md5: str, dhash: str, model_id: str, duplicate_of: str | None,
                 public_image: str = "") -> dict:
    """The item as the index keeps it. ``image`` is the reference to fetch it again by (a re-embed);
    ``image_public`` the one responses may show (a URL or an object key: never a server path)."""
    payload = {
        "item_id": item.item_id,
        "version": item.version,
        "title": item.title,
        "category_path": list(item.category_path),
        # every prefix of the path, for the query side's category filter (query.searcher.restriction)
        "category_prefixes": ["/".join(item.category_path[: n + 1]) for n in range(len(item.category_path))],
        "category": item.coarse_category,
        "image": item.image,
        "image_public": public_image,
        "md5": md5,
        "dhash": dhash,
        "model_id": model_id,
        "indexed_at": time.time(),
    }
    if item.price is not None:
        payload["price"] = item.price
    if item.shop is not None:
        payload["shop"] = item.shop
    # An int, not a bool: Qdrant Edge cannot match a bool (index.base); the query side's in-stock
    # filter matches 1. An item whose stock is not tracked counts as in stock.
    payload["in_stock"] = int(item.in_stock)
    if item.stock is not None:
        payload["stock"] = item.stock
    if item.product_group is not None:
        payload["product_group"] = item.product_group
    if duplicate_of is not None:
        payload["duplicate_of"] = duplicate_of
    return payload


# --- one index, one model ---------------------------------------------------------------------------

def single_target(index: VectorIndex, embedder: CatalogEmbedder, name: str = "",
                  titles: TitleEmbedder | None = None) -> list[WriteTarget]:
    """One serving target; ``name``: the model's registry name (what embedding processes load);
    ``titles``: the title encoder, where the index holds title vectors."""
    text_model = titles.model_id if titles is not None else ""
    return [WriteTarget(ModelRef(name or embedder.model_id, embedder.model_id, text_model), index)]


def ingest_items(items: Sequence[CatalogItem], *, index: VectorIndex, embedder: CatalogEmbedder,
                 fetcher: ImageFetcher, max_pixels: int = 40_000_000, batch_size: int = 32, streams: int = 1,
                 prefetch: bool = True, titles: TitleEmbedder | None = None) -> IngestReport:
    """``ingest`` into one index with one model; several rows of one item: ``latest_items`` decides.
    ``titles``: the title encoder, required where the index holds title vectors."""
    embedding = LocalEmbedding.single(embedder, fetcher, max_pixels=max_pixels, batch_size=batch_size,
                                      streams=streams, prefetch=prefetch)
    return ingest(latest_items(items), targets=single_target(index, embedder, titles=titles), embedding=embedding,
                  batch_size=batch_size, titles=None if titles is None else (lambda _model: titles))


def delete_items(item_ids: Sequence[str], *, index: VectorIndex, versions: Sequence[int] | None = None
                 ) -> IngestReport:
    result = index.delete(list(item_ids), versions)
    return IngestReport(deleted=result.applied, stale=result.stale)


def ingest_stream(rows: Iterable[CatalogItem | ItemFailure], *, index: VectorIndex, embedder: CatalogEmbedder,
                  fetcher: ImageFetcher, max_pixels: int = 40_000_000, batch_size: int = 32,
                  on_batch: Callable[[IngestReport, int], None] | None = None,
                  titles: TitleEmbedder | None = None) -> IngestReport:
    """Ingest a whole catalog in batches (``read_catalog`` output: items and bad rows)."""
    total = IngestReport()
    batch: list[CatalogItem] = []

    def flush() -> None:
        if not batch:
            return
        part = ingest_items(batch, index=index, embedder=embedder, fetcher=fetcher,
                            max_pixels=max_pixels, batch_size=batch_size, titles=titles)
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
