"""The HTTP API process: the upload hook (``events.hook``) plus the query routes (``query.http``),
``/healthz`` and ``/metrics``. ``uvicorn --factory tongkuan.api:create_app``.

The embedded Edge index is owned by one process; serve search from this process only against a
Qdrant server (``TONGKUAN_INDEX_BACKEND=qdrant``) or with the worker stopped.
"""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI

from events.bus import EventProducer
from events.hook import HookSettings
from events.hook import create_app as create_hook_app
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
        index = None
        if a.state.searcher is None:
            from index.factory import open_index
            from vision.runtime import VisionPipeline

            s = settings or Settings()
            vision = VisionPipeline.from_settings(s)
            index = open_index(s, vision.dim, model_id=vision.model_id)
            a.state.searcher = Searcher(index, vision, max_image_bytes=s.max_image_bytes,
                                        max_image_pixels=s.max_image_pixels)
        try:
            async with inner(a):
                yield
        finally:
            if index is not None:
                index.close()

    app.router.lifespan_context = lifespan
    return app
