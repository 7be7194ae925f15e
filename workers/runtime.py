"""What one worker process holds for its lifetime: the generation targets and their indexes, the
models, the fetcher, the embedding (in process or in embedding processes), the dead-letter producer.

``build_runtime`` makes it from the component settings (the composition root, ``tongkuan.worker``,
calls it when the worker starts); ``install``/``current`` hold the process's runtime for the thin
Celery tasks (``workers.tasks``), built on first use. On a deployment where nothing serves yet the
configured model (``TONGKUAN_RUNTIME__MODEL``, else the registry's active one) is adopted as the
serving generation; from then on the generation state, not the worker's settings, says which
models' indexes receive writes (``index.targets``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from events.deadletter import Publisher
from index.base import VectorIndex
from index.factory import open_index
from index.generations import GenerationManager
from index.remote import IndexReadService, UnknownGeneration
from index.settings import IndexSettings
from index.state import GenerationError
from index.targets import ModelRef, WriteTargets
from vision.settings import ImageSettings, RuntimeSettings
from vision.text import TitleEncoder, generation_text_model, load_text_model
from workers.cpu import limit_blas_threads, model_runs_at_once, shared_cores
from workers.embed_pool import EmbedPool
from workers.embedders import default_name, describe_model, load_embedder
from workers.embedding import CatalogEmbedder, ChunkEmbedder, LocalEmbedding
from workers.fetch import FetchSettings, ImageFetcher
from workers.pipeline import TitleLoader
from workers.settings import WorkerSettings

log = logging.getLogger(__name__)


@dataclass
class WorkerRuntime:
    worker: WorkerSettings
    image: ImageSettings
    manager: GenerationManager
    targets: WriteTargets
    fetcher: ImageFetcher
    embedding: ChunkEmbedder
    load: Callable[[str], CatalogEmbedder]  # a model's embedder in this process, by registry name
    dead_letters: Publisher
    # Title vectors: the text model a generation begun now gets ("" / 0: none), and the encoders of
    # the generations' text models in this process (vision.text), loaded on first use.
    text_model: str = ""
    text_dim: int = 0
    titles: TitleLoader | None = None
    writes_since_optimize: int = 0
    _closers: list[Callable[[], None]] = field(default_factory=list)

    @property
    def tasks_at_once(self) -> int:
        return self.worker.tasks_at_once

    def close(self) -> None:
        for close in reversed(self._closers):
            close()
        self._closers.clear()


def check_layout(index: IndexSettings, worker: WorkerSettings, pool: str, concurrency: int) -> None:
    """Refuse worker layouts that cannot work: several processes on the embedded index, or
    embedding processes under prefork."""
    if index.backend == "edge" and pool == "prefork" and concurrency > 1:
        raise RuntimeError("the embedded (edge) index is owned by one process: use TONGKUAN_WORKER__POOL=solo or "
                           "threads, or prefork with concurrency 1; several processes need the qdrant backend")
    if worker.index_read_port and pool == "prefork" and concurrency > 1:
        raise RuntimeError("TONGKUAN_WORKER__INDEX_READ_PORT serves one process's index: with prefork, use "
                           "concurrency 1 (the children would compete for the port)")
    if worker.ingest_processes and pool == "prefork":
        raise RuntimeError("ingest_processes needs the solo or threads pool: prefork's children are daemonic and "
                           "cannot start embedding processes (prefork is processes already)")


def build_runtime(*, worker: WorkerSettings, runtime: RuntimeSettings, image: ImageSettings, index: IndexSettings,
                  fetch: FetchSettings, dead_letters: Publisher, activator: Any = None) -> WorkerRuntime:
    """``activator``: where a generation switch records the active model (the model registry)."""
    limit_blas_threads()
    runs = model_runs_at_once(worker.tasks_at_once, worker.ingest_streams)
    local = shared_cores(runtime, runs)
    manager = GenerationManager(index, activator=activator)
    closers: list[Callable[[], None]] = [manager.close]
    try:
        name = default_name(worker.embedder, runtime)
        model_id, dim = describe_model(worker.embedder, runtime, name)
        text_model, text_dim = generation_text_model(runtime)
        manager.ensure_serving(model_id, name=name, dim=dim, text_model=text_model, text_dim=text_dim)
        targets = WriteTargets(manager)
        closers.append(targets.close)
        if worker.index_read_port:
            closers.append(serve_index_reads(manager, worker.index_read_addr, worker.index_read_port).close)
        fetcher = ImageFetcher.from_settings(fetch, image.max_bytes)
        models: dict[str, CatalogEmbedder] = {}
        lock = threading.Lock()

        def load(model_name: str) -> CatalogEmbedder:
            with lock:
                if model_name not in models:
                    t0 = time.perf_counter()
                    models[model_name] = load_embedder(worker.embedder, local, model_name)
                    e = models[model_name]
                    log.info("model %s (%d-d) loaded in %.1fs; providers: %s", e.model_id, e.dim,
                             time.perf_counter() - t0, getattr(getattr(e, "embedder", None), "providers", "n/a"))
                return models[model_name]

        embedding: ChunkEmbedder
        if worker.ingest_processes:
            pool = EmbedPool(worker.ingest_processes, kind=worker.embedder, runtime=runtime, fetch=fetch,
                             max_bytes=image.max_bytes, max_pixels=image.max_pixels,
                             batch_size=worker.ingest_batch_size)
            closers.append(pool.close)
            embedding = pool
            log.info("%d embedding processes", worker.ingest_processes)
        else:
            # With several tasks at once, a task fetches and decodes inline: the other tasks' model
            # runs use the cores meanwhile, and prefetch helper threads would only crowd them.
            embedding = LocalEmbedding(fetcher, lambda m: load(m.name), max_pixels=image.max_pixels,
                                       batch_size=worker.ingest_batch_size, streams=worker.ingest_streams,
                                       prefetch=worker.tasks_at_once == 1)
        closers.append(getattr(dead_letters, "close", lambda: None))
        return WorkerRuntime(worker=worker, image=image, manager=manager, targets=targets, fetcher=fetcher,
                             embedding=embedding, load=load, dead_letters=dead_letters, text_model=text_model,
                             text_dim=text_dim, titles=title_loader(runtime), _closers=closers)
    except Exception:
        for close in reversed(closers):
            close()
        raise


def title_loader(runtime: RuntimeSettings) -> TitleLoader:
    """Title encoders by text model id, each loaded once per process (thread-safe)."""
    encoders: dict[str, TitleEncoder] = {}
    lock = threading.Lock()

    def load(model_id: str) -> TitleEncoder:
        with lock:
            if model_id not in encoders:
                encoders[model_id] = load_text_model(runtime.model_dir, model_id, threads=runtime.ort_threads)
            return encoders[model_id]

    return load


def serve_index_reads(manager: GenerationManager, host: str, port: int) -> IndexReadService:
    """Serve reads of this process's generations (the ones the state names) on ``host:port``, the
    same shared ``EdgeIndex`` objects the tasks write to (``open_index`` shares per process); a
    generation is opened on its first read and held until it leaves the state or the service closes."""
    held: dict[str, VectorIndex] = {}
    lock = threading.Lock()

    def lookup(model_id: str) -> VectorIndex:
        with lock:
            try:  # every read: a dropped generation is released, not served from a deleted directory
                gen = manager.generation(model_id)
            except GenerationError as e:
                gone = held.pop(model_id, None)
                if gone is not None:
                    gone.close()
                raise UnknownGeneration(str(e)) from e
            if model_id not in held:
                held[model_id] = open_index(manager.settings, gen.dim, model_id=model_id, text_dim=gen.text_dim)
            return held[model_id]

    def release() -> None:
        with lock:
            for index in held.values():
                index.close()
            held.clear()

    return IndexReadService(lookup, host, port, on_close=release).start()


def warm_up(rt: WorkerRuntime, rounds: int = 2) -> float:
    """Run every target model as the tasks will before the first real task: as many full batches at
    once as the worker has model runs, ``rounds`` times; returns the seconds taken. ONNX Runtime
    grows its memory arena for a batch shape and for concurrent runs on their first runs: without
    this, the first two tasks of a burst took 1.9 s each against 0.56 s in steady state."""
    from PIL import Image

    models = [t.model for t in rt.targets.current()]
    if isinstance(rt.embedding, EmbedPool):
        return rt.embedding.warm_up(models, rounds)
    batch = [Image.new("RGB", (256, 256), (128, 128, 128))] * rt.worker.ingest_batch_size
    runs = model_runs_at_once(rt.tasks_at_once, rt.worker.ingest_streams)
    t0 = time.perf_counter()
    for model in models:
        embedder = rt.load(model.name)
        with ThreadPoolExecutor(runs, thread_name_prefix="warm-up") as pool:
            for _ in range(rounds):
                list(pool.map(lambda _, e=embedder: e.embed_catalog(batch, batch_size=len(batch)), range(runs)))
    return time.perf_counter() - t0


# --- the process's runtime --------------------------------------------------------------------------

_runtime: WorkerRuntime | None = None
_builder: Callable[[], WorkerRuntime] | None = None
_lock = threading.Lock()


def install(builder: Callable[[], WorkerRuntime] | None) -> None:
    """How this process builds its runtime on first use (the composition root sets it)."""
    global _builder
    with _lock:
        _builder = builder


def current() -> WorkerRuntime:
    """This process's runtime, built on first use."""
    global _runtime
    with _lock:
        if _runtime is None:
            if _builder is None:
                raise RuntimeError("no worker runtime: start the worker with `celery -A tongkuan.worker worker`")
            _runtime = _builder()
        return _runtime


def set_runtime(rt: WorkerRuntime | None) -> WorkerRuntime | None:
    """Install a built runtime (in-process demo, tests); returns the previous one (not closed)."""
    global _runtime
    with _lock:
        previous, _runtime = _runtime, rt
        return previous


__all__ = ["ModelRef", "WorkerRuntime", "build_runtime", "check_layout", "current", "install", "serve_index_reads", "set_runtime", "warm_up"]
