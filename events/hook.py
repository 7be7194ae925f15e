"""The marketplace upload hook: ``POST /v1/hooks/catalog`` → ``catalog.items``.

Request: one event object or a JSON list of them (``events.models``), signed by the marketplace:

    X-Tongkuan-Timestamp: <unix seconds>
    X-Tongkuan-Signature: sha256=<hex HMAC-SHA256(secret, f"{timestamp}.".encode() + raw_body)>

Checks, in the order that keeps unauthenticated work cheap: body size (413) → signature and replay
window (401) → JSON (400) → each event on its own (rejected with a reason). Valid events are
published keyed by item id and flushed (acks=all) *before* answering ``202``; if the bus does not
acknowledge, the answer is ``503`` and nothing is claimed accepted, so the marketplace retries the
whole request (harmless: events carry versions, and the index keeps the highest).

Replays inside the window are accepted again for the same reason; the window only bounds how long
a captured request stays usable.

``router`` is mountable in any FastAPI app that provides ``app.state.event_producer`` (or overrides
``get_producer``); ``create_app()`` builds the standalone hook service with ``/healthz`` and
``/metrics``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
from collections.abc import Sequence
from contextlib import asynccontextmanager
from functools import lru_cache
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest
from pydantic import BaseModel, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from events.bus import EventProducer, PublishError
from events.models import SCHEMA_VERSION, event_to_bytes, parse_event
from events.topics import CATALOG_ITEMS

log = logging.getLogger(__name__)

TIMESTAMP_HEADER = "X-Tongkuan-Timestamp"
SIGNATURE_HEADER = "X-Tongkuan-Signature"
SIGNATURE_PREFIX = "sha256="
# Values a secret must never have outside development (copied from examples and templates).
PLACEHOLDER_SECRETS = frozenset(
    {"", "changethis", "changeme", "change-me", "secret", "test", "dev", "password"}
)
MIN_SECRET_LEN = 32


class HookSettings(BaseSettings):
    """Env: ``TONGKUAN_HOOK_SECRET`` (required), ``TONGKUAN_ENVIRONMENT``, ``TONGKUAN_HOOK_*``."""

    model_config = SettingsConfigDict(env_prefix="TONGKUAN_", extra="ignore")

    environment: Literal["development", "staging", "production"] = "production"
    hook_secret: SecretStr
    hook_replay_window_s: int = Field(default=300, ge=1, le=3600)
    hook_max_body_bytes: int = Field(default=1024 * 1024, gt=0)
    hook_max_events: int = Field(default=1000, ge=1)
    # How long to wait for the bus to acknowledge before answering 503.
    hook_publish_timeout_s: float = Field(default=10.0, gt=0)

    @model_validator(mode="after")
    def _refuse_placeholder_secret(self) -> HookSettings:
        secret = self.hook_secret.get_secret_value()
        weak = secret.lower() in PLACEHOLDER_SECRETS or len(secret) < MIN_SECRET_LEN
        if weak and self.environment != "development":
            raise ValueError(
                f"TONGKUAN_HOOK_SECRET is a placeholder or shorter than {MIN_SECRET_LEN} characters; "
                f"set a random secret (e.g. `openssl rand -hex 32`) or TONGKUAN_ENVIRONMENT=development"
            )
        if weak:
            log.warning("hook secret is weak; acceptable only in development")
        return self


@lru_cache(maxsize=1)
def _env_hook_settings() -> HookSettings:
    return HookSettings()  # type: ignore[call-arg] - required values come from the environment


def sign(secret: str | bytes, timestamp: int | str, body: bytes) -> str:
    """The ``X-Tongkuan-Signature`` value for ``body`` sent at ``timestamp`` (for clients and tests)."""
    key = secret.encode() if isinstance(secret, str) else secret
    digest = hmac.new(key, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return SIGNATURE_PREFIX + digest


def signed_headers(secret: str | bytes, body: bytes, timestamp: int | None = None) -> dict[str, str]:
    ts = int(time.time()) if timestamp is None else timestamp
    return {
        TIMESTAMP_HEADER: str(ts),
        SIGNATURE_HEADER: sign(secret, ts, body),
        "Content-Type": "application/json",
    }


# --------------------------------------------------------------------------------------------------
# Response models


class Rejection(BaseModel):
    index: int
    item_id: str | None = None
    reason: str


class HookResponse(BaseModel):
    accepted: list[str] = Field(default_factory=list)
    rejected: list[Rejection] = Field(default_factory=list)


# --------------------------------------------------------------------------------------------------
# Metrics

HOOK_REQUESTS = Counter("tongkuan_hook_requests_total", "hook requests by HTTP status", ["status"])
HOOK_EVENTS = Counter("tongkuan_hook_events_total", "events in hook requests by outcome", ["outcome"])
HOOK_PUBLISH_SECONDS = Histogram(
    "tongkuan_hook_publish_seconds",
    "publish + flush (acks=all) time per hook request",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)


# --------------------------------------------------------------------------------------------------
# Dependencies


def get_hook_settings(request: Request) -> HookSettings:
    settings = getattr(request.app.state, "hook_settings", None)
    return settings if settings is not None else _env_hook_settings()


def get_producer(request: Request) -> EventProducer:
    producer = getattr(request.app.state, "event_producer", None)
    if producer is None:
        raise HTTPException(503, "event bus not configured")
    return producer


SettingsDep = Annotated[HookSettings, Depends(get_hook_settings)]
ProducerDep = Annotated[EventProducer, Depends(get_producer)]


def _fail(status: int, detail: str) -> HTTPException:
    HOOK_REQUESTS.labels(str(status)).inc()
    return HTTPException(status, detail)


async def _read_capped(request: Request, cap: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > cap:
        raise _fail(413, f"body larger than {cap} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > cap:
            raise _fail(413, f"body larger than {cap} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def verify_signature(
    secret: str,
    timestamp: str | None,
    signature: str | None,
    body: bytes,
    window_s: int,
    now: float | None = None,
) -> str | None:
    """None if valid, else the reason (never says which part of the signature was wrong)."""
    if not timestamp or not signature:
        return f"missing {TIMESTAMP_HEADER} or {SIGNATURE_HEADER}"
    try:
        ts = int(timestamp)
    except ValueError:
        return "malformed timestamp"
    now = time.time() if now is None else now
    if abs(now - ts) > window_s:
        return "timestamp outside the replay window"
    expected = sign(secret, timestamp, body)
    if not hmac.compare_digest(expected.encode(), signature.strip().encode()):
        return "bad signature"
    return None


def _reason(exc: ValidationError, raw: dict[str, Any]) -> str:
    sv = raw.get("schema_version", SCHEMA_VERSION)
    if sv != SCHEMA_VERSION:
        return f"unsupported schema_version {sv!r}"
    parts = []
    for err in exc.errors()[:3]:
        loc = ".".join(str(p) for p in err.get("loc", ()))
        parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
    return "; ".join(parts)


def validate_events(items: Sequence[Any]) -> tuple[list, list[Rejection]]:
    valid, rejected = [], []
    for i, raw in enumerate(items):
        if not isinstance(raw, dict):
            rejected.append(Rejection(index=i, reason="event is not a JSON object"))
            continue
        item_id = raw.get("item_id") if isinstance(raw.get("item_id"), str) else None
        try:
            valid.append(parse_event(raw))
        except ValidationError as e:
            rejected.append(Rejection(index=i, item_id=item_id, reason=_reason(e, raw)))
    return valid, rejected


def publish_events(producer: EventProducer, events: Sequence, timeout: float) -> None:
    headers = {"schema_version": str(SCHEMA_VERSION), "source": "hook"}
    for ev in events:
        producer.publish(CATALOG_ITEMS, ev.item_id, event_to_bytes(ev), {**headers, "type": ev.type})
    producer.flush(timeout)


# --------------------------------------------------------------------------------------------------
# Routes

router = APIRouter()


@router.post(
    "/v1/hooks/catalog",
    status_code=202,
    response_model=HookResponse,
    responses={400: {}, 401: {}, 413: {}, 422: {"model": HookResponse}, 503: {}},
)
async def catalog_hook(request: Request, settings: SettingsDep, producer: ProducerDep) -> Response:
    body = await _read_capped(request, settings.hook_max_body_bytes)
    problem = verify_signature(
        settings.hook_secret.get_secret_value(),
        request.headers.get(TIMESTAMP_HEADER),
        request.headers.get(SIGNATURE_HEADER),
        body,
        settings.hook_replay_window_s,
    )
    if problem:
        raise _fail(401, problem)
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise _fail(400, f"body is not valid JSON: {e}") from None
    items = payload if isinstance(payload, list) else [payload] if isinstance(payload, dict) else None
    if items is None:
        raise _fail(400, "body must be an event object or a list of events")
    if not items:
        raise _fail(400, "empty list of events")
    if len(items) > settings.hook_max_events:
        raise _fail(413, f"more than {settings.hook_max_events} events in one request")

    valid, rejected = validate_events(items)
    HOOK_EVENTS.labels("rejected").inc(len(rejected))
    if not valid:
        HOOK_REQUESTS.labels("422").inc()
        return JSONResponse(HookResponse(rejected=rejected).model_dump(), status_code=422)
    t0 = time.perf_counter()
    try:
        await run_in_threadpool(publish_events, producer, valid, settings.hook_publish_timeout_s)
    except PublishError as e:
        log.warning("hook publish failed: %s", e)
        raise _fail(503, "event bus did not acknowledge; nothing was accepted, retry the request") from None
    HOOK_PUBLISH_SECONDS.observe(time.perf_counter() - t0)
    HOOK_EVENTS.labels("accepted").inc(len(valid))
    HOOK_REQUESTS.labels("202").inc()
    resp = HookResponse(accepted=[ev.item_id for ev in valid], rejected=rejected)
    return JSONResponse(resp.model_dump(), status_code=202)


ops_router = APIRouter()


@ops_router.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@ops_router.get("/metrics")
def metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


def create_app(producer: EventProducer | None = None, settings: HookSettings | None = None) -> FastAPI:
    """The standalone hook service. Without ``producer``, a Kafka producer is built from
    ``KafkaSettings`` at start-up and closed at shutdown. Settings are validated here, at start-up."""
    hook_settings = settings or _env_hook_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        owned = None
        if app.state.event_producer is None:
            from events.kafka import make_producer

            owned = app.state.event_producer = make_producer()
        try:
            yield
        finally:
            if owned is not None:
                owned.close()

    app = FastAPI(title="tongkuan catalog hook", lifespan=lifespan)
    app.state.event_producer = producer
    app.state.hook_settings = hook_settings
    app.include_router(router)
    app.include_router(ops_router)
    return app


__all__ = [
    "HookResponse",
    "HookSettings",
    "Rejection",
    "create_app",
    "get_producer",
    "ops_router",
    "router",
    "sign",
    "signed_headers",
    "verify_signature",
]
