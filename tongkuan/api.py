"""The HTTP API process: the upload hook (``events.hook``), the query routes (``query.http``),
``/healthz`` and ``/metrics``. ``uvicorn --factory tongkuan.api:create_app``.

Configuration (``tongkuan.config.ApiConfig``) is read when the app starts. Search serves the index
generation the generation pointer names: each request takes one (model, index) pair, and a
blue/green switch is followed by a background thread every ``TONGKUAN_API__SERVING_REFRESH_S``
(it loads the new model before swapping), so no request waits for a model load. The embedded Edge
index is owned by one process: serve search from this process against a Qdrant server
(``TONGKUAN_INDEX__BACKEND=qdrant``), or with the worker stopped.

Access (``query.access``): the query routes need a key with the ``search`` scope; ``/metrics`` and the
API docs (``/docs``, ``/redoc``, ``/openapi.json``: off on the public app, served again here) need
``admin``; ``/healthz`` is open and the hook checks its own HMAC signature. Start-up refuses to run
without keys outside development. Browsers may call from ``TONGKUAN_API__CORS_ORIGINS`` only.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import Depends, FastAPI, Request, Response
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from events.bus import EventProducer
from events.hook import router as hook_router
from index.base import IndexBackendError
from index.generations import GenerationManager
from index.remote import RemoteIndex
from index.serving import ServingHolder
from query import errors
from query.access import API_KEY_HEADER, Access, access_from_settings, require
from query.body import BodyTimeouts
from query.http import DecodeSlots, get_searcher
from query.http import router as query_router
from query.interactions import Interactions, interactions_from_settings
from query.jobs import JobClient, JobStore
from query.metrics import REQUEST_SECONDS, REQUESTS
from query.page import router as page_router
from query.searcher import Searcher
from tongkuan.config import ApiConfig, load
from workers.fetch import ImageFetcher

log = logging.getLogger(__name__)


def create_app(*, config: ApiConfig | None = None, searcher: Searcher | None = None,
               producer: EventProducer | None = None, access: Access | None = None,
               jobs: JobClient | None = None, interactions: Interactions | None = None) -> FastAPI:
    """``config``: read from the environment when not given. ``searcher`` / ``producer`` / ``access`` /
    ``jobs`` / ``interactions``: use these instead of opening the index / connecting to Kafka /
    reading the keys file / the Celery app / the configured interaction log (tests, in-process use)."""
    cfg = config or load(ApiConfig)

    @asynccontextmanager
    async def lifespan(a: FastAPI):
        if cfg.environment == "development":
            log.warning("TONGKUAN_ENVIRONMENT=development: production checks are relaxed")
        # First: a process that may not serve (no keys in production) opens nothing.
        a.state.access = access or access_from_settings(cfg.api.keys_file, cfg.environment,
                                                        reload_s=cfg.api.keys_reload_s)
        a.state.body_timeouts = BodyTimeouts(idle_timeout_s=cfg.api.body_idle_timeout_s,
                                             min_rate_bps=cfg.api.min_body_rate_bps,
                                             grace_s=cfg.api.body_rate_grace_s)
        # an asyncio semaphore: made here, on the loop that serves
        a.state.decode_slots = DecodeSlots(cfg.api.decode_slots(), cfg.api.decode_queue_timeout_s)
        a.state.hook_settings = cfg.hook
        a.state.url_fetcher = ImageFetcher.from_settings(cfg.fetch.model_copy(update={"local_refs": False}),
                                                         cfg.image.max_bytes)
        a.state.image_root = cfg.fetch.object_root if cfg.fetch.local_refs else None
        if a.state.jobs is None:
            a.state.jobs = job_client(cfg)
        owned_producer = holder = owned_interactions = None
        if a.state.event_producer is None:
            from events.bus import LazyProducer
            from events.kafka import make_producer

            # made on the first hook call: an API that only searches needs no broker to start
            owned_producer = a.state.event_producer = LazyProducer(lambda: make_producer(cfg.kafka))
        if a.state.interactions is None:
            owned_interactions = a.state.interactions = interactions_from_settings(
                cfg.interactions, producer=a.state.event_producer, redis_url=cfg.celery.broker_url)
        reranker = feature_store = None
        if a.state.searcher is None and cfg.api.serve_search:
            holder = open_serving(cfg)
            holder.start_refresher(cfg.api.serving_refresh_s)
            try:
                reranker, feature_store = open_reranker(cfg)
            except Exception as e:  # noqa: BLE001 - search serves in visual order without it
                log.error("re-ranker off (visual order): the feature store did not open: %s: %s",
                          type(e).__name__, e)
            if reranker is not None:
                follow_active_model(reranker, cfg.rerank.refresh_s, holder)
            a.dependency_overrides[get_searcher] = _generation_searcher(holder, cfg, reranker)
        try:
            yield
        finally:
            if holder is not None:
                holder.close()
                holder.manager.close()
            if feature_store is not None:
                feature_store.close()
            if owned_interactions is not None:
                owned_interactions.close()
            if owned_producer is not None:
                owned_producer.close()

    # The docs are off on the public app and served below behind the admin scope.
    app = FastAPI(title="tongkuan", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.searcher = searcher
    app.state.event_producer = producer
    app.state.jobs = jobs
    app.state.interactions = interactions
    if cfg.api.cors_origins:  # none: no CORS headers at all, so browsers refuse every cross-origin call
        app.add_middleware(CORSMiddleware, allow_origins=cfg.api.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", API_KEY_HEADER, "Content-Type"],
                           expose_headers=["Retry-After"], max_age=600)
    errors.install(app)
    app.include_router(hook_router)
    app.include_router(query_router)
    app.include_router(page_router)
    admin = [Depends(require("admin"))]

    @app.middleware("http")
    async def count_requests(request: Request, call_next):
        t0 = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        name = getattr(route, "path", "unmatched")  # the template: ids do not make new series
        REQUESTS.labels(name, str(response.status_code)).inc()
        REQUEST_SECONDS.labels(name).observe(time.perf_counter() - t0)
        return response

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        """The process is up (liveness)."""
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz(searcher: Annotated[Searcher, Depends(get_searcher)]) -> dict[str, object]:
        """Search can be served: the model is loaded and the index answers (through its owner, for
        an embedded index another process holds). 503 ``{error, reason, detail}`` otherwise."""
        try:
            items = searcher.index.count()
        except IndexBackendError as e:
            raise errors.api_error(503, "index_unavailable", str(e)) from e
        return {"status": "ready", "model_id": searcher.embedder.model_id, "items": items}

    @app.get("/metrics", dependencies=admin, include_in_schema=False)
    def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/openapi.json", dependencies=admin, include_in_schema=False)
    def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    # The pages carry the schema inline: a browser's own fetch of /openapi.json would have no key.
    @app.get("/docs", dependencies=admin, include_in_schema=False)
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="tongkuan API",
                                   swagger_ui_parameters={"spec": app.openapi()})

    @app.get("/redoc", dependencies=admin, include_in_schema=False)
    def redoc() -> HTMLResponse:
        return HTMLResponse(_REDOC.format(spec=_script_json(app.openapi())))

    return app


_REDOC = """<!DOCTYPE html>
<html><head><title>tongkuan API</title><meta charset="utf-8"/>
<meta name="viewport" content="width=device-width, initial-scale=1"></head>
<body><div id="redoc"></div>
<script src="https://cdn.jsdelivr.net/npm/redoc@2/bundles/redoc.standalone.js"></script>
<script>Redoc.init({spec}, {{}}, document.getElementById("redoc"));</script>
</body></html>
"""


def _script_json(value: object) -> str:
    """JSON that is safe inside a <script> element (no "</script>" or "<!--" can close it)."""
    return json.dumps(value).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def open_serving(cfg: ApiConfig) -> ServingHolder:
    """A holder on the serving generation (the registry's active model adopted on a first start)."""
    from vision.registry import ModelRegistry
    from vision.runtime import VisionPipeline
    from vision.text import generation_text_model, load_text_model

    registry = ModelRegistry(cfg.runtime.model_dir)
    mgr = GenerationManager(cfg.index, activator=registry)
    try:
        entry, _ = registry.resolve(cfg.runtime.model)
        text_model, text_dim = generation_text_model(cfg.runtime)
        mgr.ensure_serving(entry.model_id, name=entry.name, dim=entry.dim, text_model=text_model, text_dim=text_dim)
        owner = cfg.api.index_owner_url
        holder = ServingHolder(mgr, lambda name: VisionPipeline.from_settings(
            cfg.runtime.model_copy(update={"model": name})),
            index_opener=(lambda gen: RemoteIndex(owner, gen.model_id, gen.dim)) if owner else None,
            text_factory=lambda model_id: load_text_model(cfg.runtime.model_dir, model_id,
                                                          threads=cfg.runtime.ort_threads))
        holder.refresh()
        with holder.use() as h:
            warm_up(h)
        return holder
    except Exception:
        mgr.close()
        raise


def follow_active_model(reranker, every_s: float, holder: ServingHolder) -> threading.Thread:
    """Follow the registry's ACTIVE pointer (a training run activated a new model) until the
    serving holder closes; a refused model is logged and the current one keeps serving."""

    def loop() -> None:
        while not holder.wait_closed(every_s):
            try:
                if reranker.refresh():
                    log.info("re-ranker now serves %s", reranker.active_version)
            except Exception as e:  # noqa: BLE001 - keep serving the model there is
                log.warning("re-ranker refresh failed: %s", e)

    thread = threading.Thread(target=loop, name="rerank-refresh", daemon=True)
    thread.start()
    return thread


def warm_up(handle, rounds: int = 2) -> float:
    """Run the query models before the first shopper does: ONNX Runtime sizes its memory arena on
    the first runs, which otherwise land on the first requests (hundreds of ms). Seconds taken."""
    from PIL import Image

    t0 = time.perf_counter()
    photo = Image.new("RGB", (320, 320), (128, 128, 128))
    for _ in range(rounds):
        handle.pipeline.embed_query(photo, max_regions=2)
        if handle.text is not None:
            handle.text.encode(["warm up"])
    seconds = time.perf_counter() - t0
    log.info("query models warmed up in %.2fs", seconds)
    return seconds


def job_client(cfg: ApiConfig) -> JobClient:
    """Bulk jobs go to the workers' queue by name; their ids are kept in Redis (no connection yet)."""
    import redis

    from workers.celery_app import celery_config
    from workers.celery_app import create_app as celery_app

    return JobClient(celery_app(celery_config(cfg.celery), tasks=False),
                     JobStore(redis.Redis.from_url(cfg.celery.broker_url, socket_timeout=2, socket_connect_timeout=2),
                              cfg.jobs.ttl_s), cfg.jobs.dir)


def _generation_searcher(holder: ServingHolder, cfg: ApiConfig, reranker=None):
    def dependency(request: Request):
        with holder.use() as h:  # one generation for the whole request
            yield Searcher.from_settings(h.index, h.pipeline, cfg.search, max_image_bytes=cfg.image.max_bytes,
                                         max_image_pixels=cfg.image.max_pixels, text_encoder=h.text,
                                         reranker=reranker)

    return dependency


def open_reranker(cfg: ApiConfig):
    """(re-ranker, its feature store) of ``cfg.rerank``: the registry's active model, reading the
    feature store's online features; (None, None) when off. Importing Feast costs seconds: only a
    process that serves search does it."""
    if not cfg.rerank.enabled:
        return None, None
    from feature_store.features import FEATURES
    from feature_store.store import ItemFeatureStore
    from rerank.registry import ModelRegistry
    from rerank.reranker import LightGBMReranker

    store = ItemFeatureStore(cfg.feature_store)
    store.apply()  # idempotent; the online tables exist before the first read
    reranker = LightGBMReranker(store, store_features=FEATURES, registry=ModelRegistry(cfg.rerank.models_dir),
                                tie_margin=cfg.rerank.tie_margin,
                                min_feature_coverage=cfg.rerank.min_feature_coverage)
    log.info("re-ranker: %s (features: %s online)", reranker.active_version or "no active model, visual order",
             cfg.feature_store.online.type)
    return reranker, store
