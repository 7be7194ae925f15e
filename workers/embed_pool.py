"""Embedding processes: a worker's catalog chunks fetched, decoded, hashed and embedded in child
processes, while the worker process keeps the index (its only writer) and does the rest.

Why: with the tasks of a threads-pool worker on threads, their Python stages (decode, hash,
pre-processing, the model call's bookkeeping) take turns on one GIL. In separate processes they do
not. ``python -m tongkuan.bench_ingest --in-process --layouts 1x2,2x1`` on the 2-core dev machine:
the pipeline reached 0.885-0.889 of the model-only ceiling as 1 process x 2 task threads, and
0.933-0.936 as 2 processes x 1 task; the ceiling itself is the same either way (2 threads 69.28,
2 processes 69.26 images/s). On the lent H200 machine (16 CPUs, CUDA) the gap is wider:
463 items/s as 1 x 2 against 2,093 as 8 x 2. The embedded (Edge) index belongs to one process, so
the children return vectors and hashes, and the worker process checks twins and writes.

``EmbedPool(settings, processes, embedder_factory)``: ``processes`` children, each with its own
model session (``ort_threads`` = cores / processes unless set) and its own ``ImageFetcher`` from the
same settings (so the same allow-lists, caps and address checks). ``PooledEmbedder`` wraps the
worker's own embedder with a pool: it is what ``workers.pipeline.ingest_items`` is handed, and it
offers ``embed_chunks`` (whole chunks elsewhere) beside ``embed_catalog`` (here).

Failures: an item's bad picture or failed fetch comes back as its ``ItemFailure`` as before. A
child that dies (killed, out of memory, a crash in a native decoder) breaks the pool: the call
raises ``EmbedPoolBroken`` (the task retries the batch, see ``workers.tasks``) and the next call
starts fresh children. Children exit by themselves within a second when the worker process is gone
(kill -9 included): nothing else would tell them, since they hold their own end of the job queue.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import numpy as np

from events.item import CatalogItem, ItemFailure

log = logging.getLogger(__name__)

# One chunk's result: (items ready with their md5/dhash, their vectors or None, failures, stage seconds)
ChunkResult = tuple[list[Any], np.ndarray | None, list[ItemFailure], dict[str, float]]


class EmbedPoolBroken(RuntimeError):
    """An embedding process died mid-chunk; the batch is retried on fresh processes."""


# --- in the child ----------------------------------------------------------------------------------

_child: dict[str, Any] = {}


def _watch_parent(parent: int, every_s: float = 0.5) -> None:
    while True:
        if os.getppid() != parent:
            os._exit(0)
        time.sleep(every_s)


def _child_init(settings: Any, embedder_factory: str, parent: int) -> None:
    from workers.celery_app import load_ref
    from workers.fetch import ImageFetcher
    from workers.tasks import limit_blas_threads

    threading.Thread(target=_watch_parent, args=(parent,), name="watch-parent", daemon=True).start()
    limit_blas_threads()
    _child["embedder"] = load_ref(embedder_factory)(settings)
    _child["fetcher"] = ImageFetcher.from_settings(settings)


def _child_chunk(items: Sequence[CatalogItem], max_pixels: int) -> tuple[str, ChunkResult]:
    """(this child's model id, the chunk's result)."""
    from workers.pipeline import embed_prepared, prepare_chunk

    embedder, fetcher = _child["embedder"], _child["fetcher"]
    ready, tensors, failures, seconds = prepare_chunk(items, fetcher, max_pixels, embedder, tensors=True)
    vectors = embed_prepared(embedder, ready, tensors, seconds, batch_size=len(items))
    for p in ready:
        p.image = None  # the worker process needs the hashes and vectors, not the pixels
    return embedder.model_id, (ready, vectors, failures, seconds)


def _child_warm_up(batch: int) -> str:
    from PIL import Image

    embedder = _child["embedder"]
    embedder.embed_catalog([Image.new("RGB", (256, 256), (128, 128, 128))] * batch, batch_size=batch)
    return embedder.model_id


# --- in the worker process -------------------------------------------------------------------------


class EmbedPool:
    """``processes`` children running ``embedder_factory(settings)``. ``model_id``: the model the
    worker process writes for; a child that loaded another (a registry changed under it) fails
    the call rather than mix two models' vectors in one index."""

    def __init__(self, settings: Any, processes: int, embedder_factory: str, model_id: str):
        if processes < 1:
            raise ValueError("an embedding pool needs at least one process")
        self.processes = processes
        self.embedder_factory = embedder_factory
        self.model_id = model_id
        cores = os.cpu_count() or 1
        self.settings = (settings if settings.ort_threads
                         else settings.model_copy(update={"ort_threads": max(1, cores // processes)}))
        self._lock = threading.Lock()
        self._executor: ProcessPoolExecutor | None = None
        self.restarts = 0

    def _get(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._executor is None:
                import multiprocessing as mp

                # spawn: the worker process has threads (Celery's pool, Kafka, metrics); fork would copy
                # their locks in whatever state they were in.
                self._executor = ProcessPoolExecutor(
                    self.processes, mp_context=mp.get_context("spawn"), initializer=_child_init,
                    initargs=(self.settings, self.embedder_factory, os.getpid()))
            return self._executor

    def _reset(self, broken: ProcessPoolExecutor) -> None:
        with self._lock:
            if self._executor is broken:
                self._executor = None
                self.restarts += 1
        broken.shutdown(wait=False, cancel_futures=True)

    def embed_chunks(self, chunks: Sequence[Sequence[CatalogItem]], max_pixels: int) -> Iterator[ChunkResult]:
        """Each chunk fetched → decoded → hashed → embedded in a child, all submitted at once;
        results in chunk order."""
        executor = self._get()
        try:
            futures: list[Future] = [executor.submit(_child_chunk, list(c), max_pixels) for c in chunks]
            for f in futures:
                model_id, result = f.result()
                self._check(model_id)
                yield result
        except BrokenProcessPool as e:
            self._reset(executor)
            raise EmbedPoolBroken(f"an embedding process died: {e}") from e

    def warm_up(self, batch: int, rounds: int = 2) -> float:
        """Start every child and run the model ``rounds`` times in each (see ``workers.tasks.warm_up``)."""
        executor = self._get()
        t0 = time.perf_counter()
        try:
            for _ in range(rounds):
                for model_id in executor.map(_child_warm_up, [batch] * self.processes):
                    self._check(model_id)
        except BrokenProcessPool as e:
            self._reset(executor)
            raise EmbedPoolBroken(f"an embedding process died during warm-up: {e}") from e
        return time.perf_counter() - t0

    def _check(self, model_id: str) -> None:
        if model_id != self.model_id:
            raise RuntimeError(f"an embedding process runs {model_id}, the worker writes {self.model_id}")

    def pids(self) -> list[int]:
        ex = self._executor
        return sorted(ex._processes) if ex is not None and ex._processes else []  # noqa: SLF001

    def close(self) -> None:
        with self._lock:
            ex, self._executor = self._executor, None
        if ex is not None:
            ex.shutdown(wait=True, cancel_futures=True)


class PooledEmbedder:
    """The worker's embedder (``model_id``, ``dim``, ``embed_catalog`` here) plus an ``EmbedPool``
    whose children run the same model for whole ingest chunks (``embed_chunks``)."""

    def __init__(self, embedder: Any, pool: EmbedPool):
        if pool.model_id != embedder.model_id:
            raise ValueError(f"pool for {pool.model_id}, embedder {embedder.model_id}")
        self.local = embedder
        self.pool = pool
        self.model_id = embedder.model_id
        self.dim = embedder.dim

    @property
    def embedder(self) -> Any:  # the ORT session wrapper, where the local embedder has one
        return getattr(self.local, "embedder", None)

    def embed_catalog(self, images: Any, batch_size: int = 32) -> np.ndarray:
        return self.local.embed_catalog(images, batch_size=batch_size)

    def embed_chunks(self, chunks: Sequence[Sequence[CatalogItem]], max_pixels: int) -> Iterator[ChunkResult]:
        return self.pool.embed_chunks(chunks, max_pixels)

    def close(self) -> None:
        self.pool.close()
