"""The marketplace upload hook: ``POST /v1/hooks/catalog`` → ``catalog.items`` / ``catalog.features``.

Request: one event object or a JSON list of them (``events.models``), signed by the marketplace:

    X-Tongkuan-Timestamp: <unix seconds>
    X-Tongkuan-Signature: sha256=<hex HMAC-SHA256(secret, f"{timestamp}.".encode() + raw_body)>

Checks, in the order that keeps unauthenticated work cheap: body size (413) → signature and replay
window (401) → JSON (400) → each event on its own (``events.contract.validate_event``: rejected
with a reason). Valid state events (upserts, deletes) are published to ``catalog.items`` and feature
events to ``catalog.features``, keyed by item id, and flushed (acks=all) *before* answering ``202``;
if the bus does not acknowledge, the answer is ``503`` and nothing is claimed accepted, so the
marketplace retries the whole request (harmless: events carry versions, and the index keeps the
highest).

Replays inside the window are accepted again for the same reason; the window only bounds how long
a captured request stays usable.

``router`` is mountable in any FastAPI app that provides ``app.state.event_producer`` and
``app.state.hook_settings`` (``tongkuan.api`` does).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from collections.abc import Sequence
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from prometheus_client import Counter, Histogram
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from events.bus import EventProducer, PublishError
from events.contract import MAX_JSON_DEPTH, JsonError, Rejected, loads, validate_event
from events.models import SCHEMA_VERSION, CatalogEvent, ItemFeaturesUpdated, event_to_bytes
from events.topics import CATALOG_FEATURES, CATALOG_ITEMS

log = logging.getLogger(__name__)

TIMESTAMP_HEADER = "X-Tongkuan-Timestamp"
SIGNATURE_HEADER = "X-Tongkuan-Signature"
SIGNATURE_PREFIX = "sha256="
# Values a secret must never have outside development (copied from examples and templates).
PLACEHOLDER_SECRETS = frozenset(
    {"", "changethis", "changeme", "change-me", "secret", "test", "dev", "password"}
)
MIN_SECRET_LEN = 32


class HookSettings(BaseModel):
    """The upload hook (env ``TONGKUAN_HOOK__*``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    secret: SecretStr = Field(description="HMAC-SHA256 key shared with the marketplace (required; "
                              "32+ random characters outside development)")
    replay_window_s: int = Field(default=300, ge=1, le=3600,
                                 description="how far a request's timestamp may be from now, either way")
    max_body_bytes: int = Field(default=1024 * 1024, gt=0, description="request body cap (413 above it)")
    max_events: int = Field(default=1000, ge=1, description="events per request at most (413 above it)")
    publish_timeout_s: float = Field(default=10.0, gt=0,
                                     description="how long the bus may take to acknowledge before the hook answers 503")


def secret_problem(secret: str, environment: str) -> str | None:
    """Why ``secret`` may not be used in ``environment`` (None: it may). Outside development a
    placeholder (copied from an example) or a short secret is refused at start-up."""
    weak = secret.lower() in PLACEHOLDER_SECRETS or len(secret) < MIN_SECRET_LEN
    if weak and environment != "development":
        return (f"TONGKUAN_HOOK__SECRET is a placeholder or shorter than {MIN_SECRET_LEN} characters; set a "
                f"random secret (e.g. `openssl rand -hex 32`) or TONGKUAN_ENVIRONMENT=development")
    if weak:
        log.warning("hook secret is weak; acceptable only in development")
    return None


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
    reason: str = Field(description="reason code: invalid_event, unknown_schema_version (events.contract)")
    detail: str = Field(default="", description="which fields are wrong and why")


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
    if settings is None:
        raise HTTPException(503, "the upload hook is not configured in this process")
    return settings


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


def validate_events(items: Sequence[Any]) -> tuple[list[CatalogEvent], list[Rejection]]:
    valid, rejected = [], []
    for i, raw in enumerate(items):
        result = validate_event(raw)
        if isinstance(result, Rejected):
            rejected.append(Rejection(index=i, item_id=result.item_id, reason=result.reason, detail=result.detail))
        else:
            valid.append(result)
    return valid, rejected


def topic_for(event: CatalogEvent) -> str:
    """State events go to the embedding workers, feature events to the feature platform."""
    return CATALOG_FEATURES if isinstance(event, ItemFeaturesUpdated) else CATALOG_ITEMS


def publish_events(producer: EventProducer, events: Sequence[CatalogEvent], timeout: float) -> None:
    headers = {"schema_version": str(SCHEMA_VERSION), "source": "hook"}
    for ev in events:
        producer.publish(topic_for(ev), ev.item_id, event_to_bytes(ev), {**headers, "type": ev.type})
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
    body = await _read_capped(request, settings.max_body_bytes)
    problem = verify_signature(
        settings.secret.get_secret_value(),
        request.headers.get(TIMESTAMP_HEADER),
        request.headers.get(SIGNATURE_HEADER),
        body,
        settings.replay_window_s,
    )
    if problem:
        raise _fail(401, problem)
    try:
        payload = loads(body, max_depth=MAX_JSON_DEPTH + 1)  # + the list around the events
    except JsonError as e:
        raise _fail(400, f"body is not valid JSON: {e}") from None
    items = payload if isinstance(payload, list) else [payload] if isinstance(payload, dict) else None
    if items is None:
        raise _fail(400, "body must be an event object or a list of events")
    if not items:
        raise _fail(400, "empty list of events")
    if len(items) > settings.max_events:
        raise _fail(413, f"more than {settings.max_events} events in one request")

    valid, rejected = validate_events(items)
    HOOK_EVENTS.labels("rejected").inc(len(rejected))
    if not valid:
        HOOK_REQUESTS.labels("422").inc()
        return JSONResponse(HookResponse(rejected=rejected).model_dump(), status_code=422)
    t0 = time.perf_counter()
    try:
        await run_in_threadpool(publish_events, producer, valid, settings.publish_timeout_s)
    except PublishError as e:
        log.warning("hook publish failed: %s", e)
        raise _fail(503, "event bus did not acknowledge; nothing was accepted, retry the request") from None
    HOOK_PUBLISH_SECONDS.observe(time.perf_counter() - t0)
    HOOK_EVENTS.labels("accepted").inc(len(valid))
    HOOK_REQUESTS.labels("202").inc()
    resp = HookResponse(accepted=[ev.item_id for ev in valid], rejected=rejected)
    return JSONResponse(resp.model_dump(), status_code=202)


__all__ = [
    "HookResponse",
    "HookSettings",
    "Rejection",
    "get_producer",
    "router",
    "secret_problem",
    "sign",
    "signed_headers",
    "topic_for",
    "verify_signature",
]
