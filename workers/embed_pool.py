"""Embedding processes: a worker's catalog chunks fetched, decoded, hashed and embedded in child
processes, while the worker process keeps the index (its only writer) and does the rest.

Why: with the tasks of a threads-pool worker on threads, their Python stages (decode, hash,
pre-processing, the model call's bookkeeping) take turns on one GIL. In separate processes they do
not. ``python -m offline bench-ingest --in-process --layouts 1x2,2x1`` on the 2-core dev machine:
the pipeline reached 0.885-0.889 of the model-only ceiling as 1 process x 2 task threads, and
0.933-0.936 as 2 processes x 1 task; the ceiling itself is the same either way (2 threads 69.28,
2 processes 69.26 images/s). On the lent H200 machine (16 CPUs, CUDA) the gap is wider:
463 items/s as 1 x 2 against 2,093 as 8 x 2. The embedded (Edge) index belongs to one process, so
the children return vectors and hashes, and the worker process checks twins and writes.

``EmbedPool`` is a ``workers.pipeline.ChunkEmbedder``: each child has its own ``ImageFetcher``
from the same settings (so the same allow-lists, caps and address checks) and loads the models it
is asked for by name (``workers.embedders``), one ORT session each with ``ort_threads`` = cores /
processes unless set. A chunk is fetched and decoded once and embedded with every target model.

Failures: an item's bad picture or failed fetch comes back as its ``ItemFailure`` as before. A
child that dies (killed, out of memory, a crash in a native decoder) breaks the pool: the call
raises ``EmbedPoolBroken`` (the task retries the batch) and the next call starts fresh children.
A child whose model loads under another id than its generation's is refused (one index never mixes
two models). Children exit by themselves within a second when the worker process is gone (kill -9
included): nothing else would tell them, since they hold their own end of the job queue.
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

from events.item import CatalogItem
from index.targets import ModelRef
from vision.settings import RuntimeSettings
from workers.cpu import limit_blas_threads
from workers.embedders import load_embedder
from workers.embedding import ChunkResult, ModelMismatch, embed_isolating, prepare_chunk
from workers.fetch import FetchSettings, ImageFetcher

log = logging.getLogger(__name__)


class EmbedPoolBroken(RuntimeError):
    """An embedding process died mid-chunk; the batch is retried on fresh processes."""


# --- in the child ----------------------------------------------------------------------------------

_child: dict[str, Any] = {}


def _watch_parent(parent: int, every_s: float = 0.5) -> None:
    while True:
        if os.getppid() != parent:
            os._exit(0)
        time.sleep(every_s)


def _child_init(kind: str, runtime: RuntimeSettings, fetch: FetchSettings, max_bytes: int, parent: int) -> None:
    threading.Thread(target=_watch_parent, args=(parent,), name="watch-parent", daemon=True).start()
    limit_blas_threads()
    _child.update(kind=kind, runtime=runtime, models={},
                  fetcher=ImageFetcher.from_settings(fetch, max_bytes))


def _embedder(name: str) -> Any:
    models = _child["models"]
    if name not in models:
        models[name] = load_embedder(_child["kind"], _child["runtime"], name)
    return models[name]


def _child_chunk(items: Sequence[CatalogItem], names: Sequence[str], max_pixels: int, batch_size: int,
                 ) -> tuple[list[str], ChunkResult]:
    """(the model ids this child ran, the chunk's result)."""
    embedders = [_embedder(n) for n in names]
    ready, failures, seconds = prepare_chunk(items, _child["fetcher"], max_pixels)
    ready, vectors, more = embed_isolating(ready, embedders, seconds, batch_size)
    failures += more
    for p in ready:
        p.image = None  # the worker process needs the hashes and vectors, not the pixels
    return [e.model_id for e in embedders], (ready, vectors, failures, seconds)


def _child_warm_up(names: Sequence[str], batch: int) -> list[str]:
    from PIL import Image

    images = [Image.new("RGB", (256, 256), (128, 128, 128))] * batch
    out = []
    for name in names:
        embedder = _embedder(name)
        embedder.embed_catalog(images, batch_size=batch)
        out.append(embedder.model_id)
    return out


# --- in the worker process -------------------------------------------------------------------------


class EmbedPool:
    def __init__(self, processes: int, *, kind: str, runtime: RuntimeSettings, fetch: FetchSettings,
                 max_bytes: int, max_pixels: int, batch_size: int = 32):
        if processes < 1:
            raise ValueError("an embedding pool needs at least one process")
        self.processes = processes
        cores = os.cpu_count() or 1
        self._initargs = (kind, runtime if runtime.ort_threads
                          else runtime.model_copy(update={"ort_threads": max(1, cores // processes)}),
                          fetch, max_bytes)
        self.max_pixels, self.batch_size = max_pixels, batch_size
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
                    initargs=(*self._initargs, os.getpid()))
            return self._executor

    def _reset(self, broken: ProcessPoolExecutor) -> None:
        with self._lock:
            if self._executor is broken:
                self._executor = None
                self.restarts += 1
        broken.shutdown(wait=False, cancel_futures=True)

    def embed_chunks(self, chunks: Sequence[Sequence[CatalogItem]], models: Sequence[ModelRef]) -> Iterator[ChunkResult]:
        """Each chunk fetched → decoded → hashed → embedded (every model) in a child, all submitted
        at once; results in chunk order."""
        executor = self._get()
        names = [m.name for m in models]
        try:
            futures: list[Future] = [executor.submit(_child_chunk, list(c), names, self.max_pixels, self.batch_size)
                                     for c in chunks]
            for f in futures:
                model_ids, result = f.result()
                self._check(models, model_ids)
                yield result
        except BrokenProcessPool as e:
            self._reset(executor)
            raise EmbedPoolBroken(f"an embedding process died: {e}") from e

    def warm_up(self, models: Sequence[ModelRef], rounds: int = 2) -> float:
        """Start every child, load the models and run each ``rounds`` times (ONNX Runtime grows its
        arena on the first runs of a batch shape)."""
        executor = self._get()
        names = [m.name for m in models]
        t0 = time.perf_counter()
        try:
            for _ in range(rounds):
                for model_ids in executor.map(_child_warm_up, [names] * self.processes,
                                              [self.batch_size] * self.processes):
                    self._check(models, model_ids)
        except BrokenProcessPool as e:
            self._reset(executor)
            raise EmbedPoolBroken(f"an embedding process died during warm-up: {e}") from e
        return time.perf_counter() - t0

    @staticmethod
    def _check(models: Sequence[ModelRef], model_ids: Sequence[str]) -> None:
        for model, got in zip(models, model_ids, strict=True):
            if model.model_id != got:
                raise ModelMismatch(f"an embedding process runs {got} for {model.name!r}; its generation "
                                       f"is {model.model_id}")

    def pids(self) -> list[int]:
        ex = self._executor
        return sorted(ex._processes) if ex is not None and ex._processes else []  # noqa: SLF001

    def close(self) -> None:
        with self._lock:
            ex, self._executor = self._executor, None
        if ex is not None:
            ex.shutdown(wait=True, cancel_futures=True)
