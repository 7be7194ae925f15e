"""The HTTP API process: the upload hook (``events.hook``), the query routes (``query.http``),
``/healthz`` and ``/metrics``. ``uvicorn --factory tongkuan.api:create_app``.

Configuration (``tongkuan.config.ApiConfig``) is read when the app starts. Search serves the index
generation the generation pointer names: each request takes one (model, index) pair, and a
blue/green switch is followed by a background thread every ``TONGKUAN_API__SERVING_REFRESH_S``
(it loads the new model before swapping), so no request waits for a model load. The embedded Edge
index is owned by one process: serve search from this process against a Qdrant server
(``TONGKUAN_INDEX__BACKEND=qdrant``), or with the worker stopped.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from events.bus import EventProducer
from events.hook import router as hook_router
from index.generations import GenerationManager
from index.serving import ServingHolder
from query.http import get_searcher
from query.http import router as query_router
from query.searcher import Searcher
from tongkuan.config import ApiConfig, load

log = logging.getLogger(__name__)


def create_app(*, config: ApiConfig | None = None, searcher: Searcher | None = None,
               producer: EventProducer | None = None) -> FastAPI:
    """``config``: read from the environment at start-up when not given. ``searcher`` / ``producer``:
    use these instead of opening the index / connecting to Kafka (tests, in-process use)."""

    @asynccontextmanager
    async def lifespan(a: FastAPI):
        cfg = config or load(ApiConfig)
        if cfg.environment == "development":
            log.warning("TONGKUAN_ENVIRONMENT=development: production checks are relaxed")
        a.state.hook_settings = cfg.hook
        owned_producer = holder = None
        if a.state.event_producer is None:
            from events.kafka import make_producer

            owned_producer = a.state.event_producer = make_producer(cfg.kafka)
        if a.state.searcher is None and cfg.api.serve_search:
            holder = open_serving(cfg)
            holder.start_refresher(cfg.api.serving_refresh_s)
            a.dependency_overrides[get_searcher] = _generation_searcher(holder, cfg)
        try:
            yield
        finally:
            if holder is not None:
                holder.close()
                holder.manager.close()
            if owned_producer is not None:
                owned_producer.close()

    app = FastAPI(title="tongkuan", lifespan=lifespan)
    app.state.searcher = searcher
    app.state.event_producer = producer
    app.include_router(hook_router)
    app.include_router(query_router)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app


def open_serving(cfg: ApiConfig) -> ServingHolder:
    """A holder on the serving generation (the registry's active model adopted on a first start)."""
    from vision.registry import ModelRegistry
    from vision.runtime import VisionPipeline

    registry = ModelRegistry(cfg.runtime.model_dir)
    mgr = GenerationManager(cfg.index, activator=registry)
    try:
        entry, _ = registry.resolve(cfg.runtime.model)
        mgr.ensure_serving(entry.model_id, name=entry.name, dim=entry.dim)
        holder = ServingHolder(mgr, lambda name: VisionPipeline.from_settings(
            cfg.runtime.model_copy(update={"model": name})))
        holder.refresh()
        return holder
    except Exception:
        mgr.close()
        raise


def _generation_searcher(holder: ServingHolder, cfg: ApiConfig):
    def dependency(request: Request):
        with holder.use() as h:  # one generation for the whole request
            yield Searcher.from_settings(h.index, h.pipeline, cfg.search, max_image_bytes=cfg.image.max_bytes,
                                         max_image_pixels=cfg.image.max_pixels)

    return dependency
