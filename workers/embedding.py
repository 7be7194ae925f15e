"""Fetch → decode → hash → embed for chunks of catalog items, for one or several models at once:
the part of the pipeline that the embedding processes (``workers.embed_pool``) can also run.

``LocalEmbedding`` does it in this process; ``EmbedPool`` in child processes; both are a
``ChunkEmbedder``. A picture that cannot be fetched, decoded or embedded becomes its item's
``ItemFailure`` (a reason code: the fetch's or the decoder's, else ``processing_failed`` for an
exception of any other type); the rest of the chunk goes on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from PIL import Image

from events.contract import PROCESSING_FAILED
from events.item import CatalogItem, ItemFailure
from index.targets import ModelRef
from vision.decode import ImageError, decode_image
from workers.dedup import dhash_hex, md5_hex, trim_background
from workers.fetch import FetchError, ImageFetcher

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
    public: str = ""  # what a search hit may show of the image: its URL or object key, never a path


# One chunk: (items ready, with their hashes; their vectors per model id; failures; stage seconds)
ChunkResult = tuple[list[Prepared], dict[str, np.ndarray], list[ItemFailure], dict[str, float]]


class ChunkEmbedder(Protocol):
    """Fetch → decode → hash → embed for chunks of items, for several models at once: in this
    process (``LocalEmbedding``) or in embedding processes (``workers.embed_pool.EmbedPool``)."""

    def embed_chunks(self, chunks: Sequence[Sequence[CatalogItem]], models: Sequence[ModelRef]) -> Iterator[ChunkResult]: ...


class ModelMismatch(RuntimeError):
    """A model loads under another id than its generation's: one index never mixes two models."""


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
                prepared.append(Prepared(it, image, md5_hex(data), dhash_hex(trim_background(image)),
                                         fetcher.public_ref(it.image)))
        except (FetchError, ImageError) as e:
            failures.append(ItemFailure(item_id=it.item_id, reason=e.reason, detail=e.detail))
        except Exception as e:  # noqa: BLE001 - whatever one item does, it costs that item only
            failures.append(processing_failed(it.item_id, e))
    return prepared, failures, seconds


def processing_failed(item_id: str, error: BaseException) -> ItemFailure:
    """An item that failed in a way no check foresaw: dead-lettered on its own, never the batch."""
    log.warning("item %s failed: %s: %s", item_id, type(error).__name__, error, exc_info=error)
    return ItemFailure(item_id=item_id, reason=PROCESSING_FAILED, detail=f"{type(error).__name__}: {error}"[:500])


def embed_isolating(prepared: list[Prepared], embedders: Sequence[CatalogEmbedder], seconds: dict[str, float],
                    batch_size: int) -> tuple[list[Prepared], dict[str, np.ndarray], list[ItemFailure]]:
    """``embed_prepared`` for the chunk; if the chunk fails, item by item, so that the one picture
    the model cannot take fails alone. If every item then fails too, the fault is not theirs (the
    model or its process): the chunk's error is raised, and the batch is retried as a whole."""
    try:
        return prepared, embed_prepared(prepared, embedders, seconds, batch_size), []
    except Exception as e:  # noqa: BLE001 - find the item(s) at fault below
        if len(prepared) == 1:
            return [], {}, [processing_failed(prepared[0].item.item_id, e)]
        chunk_error = e
    ready: list[Prepared] = []
    parts: dict[str, list[np.ndarray]] = {e.model_id: [] for e in embedders}
    failures: list[ItemFailure] = []
    for p in prepared:
        try:
            vectors = embed_prepared([p], embedders, seconds, batch_size)
        except Exception as e:  # noqa: BLE001
            failures.append(processing_failed(p.item.item_id, e))
            continue
        ready.append(p)
        for model_id, v in vectors.items():
            parts[model_id].append(v)
    if not ready:
        raise chunk_error
    return ready, ({m: np.concatenate(v) for m, v in parts.items()} if ready else {}), failures


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
            return self._embedded(ready, failures, seconds, embedders)

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
                yield self._embedded(ready, failures, seconds, embedders)

    def _embedded(self, ready: list[Prepared], failures: list[ItemFailure], seconds: dict[str, float],
                  embedders: Sequence[CatalogEmbedder]) -> ChunkResult:
        ready, vectors, more = embed_isolating(ready, embedders, seconds, self.batch_size)
        return ready, vectors, failures + more, seconds

    def _checked(self, model: ModelRef) -> CatalogEmbedder:
        embedder = self.load(model)
        if embedder.model_id != model.model_id:
            raise ModelMismatch(f"model {model.name!r} loads as {embedder.model_id}, its generation is "
                                   f"{model.model_id}: one index never mixes two models")
        return embedder
