"""The HTTP API process: the upload hook (``events.hook``) plus the query routes (``query.http``),
``/healthz`` and ``/metrics``. ``uvicorn --factory tongkuan.api:create_app``.

Search serves the index generation the generation pointer names (``index.generations``): each request
takes one (model, index) pair, and a blue/green switch (``tongkuan reembed``) is followed within
``REFRESH_S`` without mixing models in a query. The embedded Edge index is owned by one process:
serve search from this process against a Qdrant server (``TONGKUAN_INDEX_BACKEND=qdrant``), or with
the worker stopped.
"""

from __future__ import annotations

import threading
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request

from events.bus import EventProducer
from events.hook import HookSettings
from events.hook import create_app as create_hook_app
from query.http import get_searcher
from query.http import router as query_router
from query.searcher import Searcher
from tongkuan.settings import Settings


def create_app(
    *,
    searcher: Searcher | None = None,
    producer: EventProducer | None = None,
    hook_settings: HookSettings | None = None,
    settings: Settings | None = None,
) -> FastAPI:
    app = create_hook_app(producer=producer, settings=hook_settings)
    app.title = "tongkuan"
    app.state.searcher = searcher
    app.include_router(query_router)
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(a: FastAPI):
        holder = None
        s = settings or Settings()
        if a.state.searcher is None and s.serve_search:
            holder = _open_serving(s)
            a.dependency_overrides[get_searcher] = _generation_searcher(holder, s)
        try:
            async with inner(a):
                yield
        finally:
            if holder is not None:
                holder.close()

    app.router.lifespan_context = lifespan
    return app


REFRESH_S = 2.0  # how often a request may re-read the generation pointer


def _open_serving(s: Settings):
    from index.generations import GenerationManager
    from vision.registry import ModelRegistry
    from vision.runtime import VisionPipeline

    mgr = GenerationManager(s)
    if mgr.serving() is None:  # first start: the registry's active model serves
        entry, _ = ModelRegistry(s.model_dir).resolve(s.model)
        mgr.adopt(entry.model_id, name=entry.name, dim=entry.dim)
    return mgr.open_serving(lambda name: VisionPipeline.from_registry(s.model_dir, name, threads=s.ort_threads))


def _generation_searcher(holder, s: Settings):
    lock = threading.Lock()
    checked = [0.0]

    def dependency(request: Request):
        now = time.monotonic()
        with lock:
            if now - checked[0] > REFRESH_S:
                checked[0] = now
                holder.refresh()
        with holder.use() as h:  # one generation for the whole request
            yield Searcher(h.index, h.pipeline, max_image_bytes=s.max_image_bytes,
                           max_image_pixels=s.max_image_pixels)

    return dependency
