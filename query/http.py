"""HTTP routes of the query side. Thin: they parse (``query.inputs``), call ``Searcher`` and map
errors to ``{error, reason, detail}`` (``query.errors``).

* ``POST /v1/search?limit=&objects=`` — the photo as raw bytes (JPEG/PNG/WebP), a multipart form
  (``image`` file; ``text``, ``limit``, ``objects``, ``category``, ``shop`` fields) or JSON
  (``query.models.SearchRequest``: ``image_base64`` or ``image_url``, filters). An ``image_url`` is
  fetched with the ingest fetcher's checks (public addresses only, byte cap, total deadline; never
  a local path). 413 over the byte cap, 408 for a body that stalls or trickles (``query.body``),
  400/415/422 with the reason for a body, field or image that cannot be used (``bad_json``,
  ``bad_base64``, ``invalid_request``, ``empty``, ``corrupt``, ``too_many_pixels``, a fetch reason
  such as ``private_address``; 502 when the image's server times out or fails), 503 with
  ``Retry-After`` when every decode slot stays busy, 503
  ``index_unavailable`` when the index (or its owning process) does not answer.
* ``GET /v1/items/{item_id}`` — the indexed listing; ``GET /v1/items/{item_id}/similar?limit=`` —
  for recommenders, without the item and its near duplicates. 404 ``unknown_item``.
* ``POST /v1/feedback`` — a click, add-to-cart or order against a search's request id
  (``query.interactions``; every search also records what it showed). 404 ``unknown_request``, 422
  ``not_shown`` / ``invalid_request``, 503 ``interactions_off`` / ``interactions_unavailable``.
* ``POST /v1/similar/bulk`` — a job over ids or a category (``query.jobs``), 202 with its id;
  ``GET /v1/jobs/{id}`` its status, ``GET /v1/jobs/{id}/result`` the JSONL. 404 ``unknown_job``,
  409 ``not_ready``, 503 ``queue_unavailable``.

All need a key with the ``search`` scope (``query.access``: 401/403/429), checked before the body is
read. ``app.state`` provides ``access``, ``body_timeouts``, ``decode_slots`` and ``url_fetcher``
(``tongkuan.api`` sets them at start-up).
"""

from __future__ import annotations

import asyncio
import math
import re
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse
from pydantic import ValidationError

from events.fields import UnsupportedScheme, normalize_ref
from index.base import IndexBackendError
from query.access import require
from query.body import BodyTimeouts, read_body
from query.errors import api_error
from query.inputs import BadInput, parse_search
from query.interactions import Interactions, NotShown, UnknownRequest, query_id
from query.jobs import BulkSimilarRequest, JobClient, result_path
from query.metrics import QUERIES, QUERY_ERRORS, REJECTED
from query.models import (
    MAX_LIMIT,
    MAX_OBJECTS,
    ErrorOut,
    FeedbackOut,
    FeedbackRequest,
    ItemOut,
    SearchHit,
    SearchResponse,
)
from query.searcher import Searcher, TextUnsupportedError, UnknownItemError
from vision.decode import ImageError
from workers.fetch import FetchError, ImageFetcher

_ERRORS = {code: {"model": ErrorOut} for code in (400, 401, 403, 404, 408, 409, 413, 415, 422, 429, 502, 503)}
router = APIRouter(prefix="/v1", tags=["query"], dependencies=[Depends(require("search"))], responses=_ERRORS)


class DecodeSlots:
    """At most ``limit`` searches decode and embed at once; a search waits up to ``wait_s`` for a slot,
    then is answered 503 (load shedding: a queue longer than that only turns into timeouts upstream).

    An ``asyncio.Semaphore``: create it on the loop that serves (``tongkuan.api`` does, at start-up).
    The limit is per process (each uvicorn worker has its own)."""

    def __init__(self, limit: int, wait_s: float):
        self.limit, self.wait_s = limit, wait_s
        self._free = asyncio.Semaphore(limit)

    @asynccontextmanager
    async def hold(self) -> AsyncIterator[None]:
        try:
            async with asyncio.timeout(self.wait_s):
                await self._free.acquire()
        except TimeoutError:
            REJECTED.labels("busy").inc()
            raise api_error(503, "busy", f"all {self.limit} decode slots are busy; retry shortly",
                            headers={"Retry-After": str(max(1, math.ceil(self.wait_s)))}) from None
        try:
            yield
        finally:
            self._free.release()


def get_searcher(request: Request) -> Searcher:
    searcher = getattr(request.app.state, "searcher", None)
    if searcher is None:
        raise api_error(503, "search_off", "search is not served by this process (TONGKUAN_API__SERVE_SEARCH="
                        "false); the embedded index is searched through its owner (TONGKUAN_API__INDEX_OWNER_URL)")
    return searcher


def get_body_timeouts(request: Request) -> BodyTimeouts:
    return _started(request, "body_timeouts")


def get_decode_slots(request: Request) -> DecodeSlots:
    return _started(request, "decode_slots")


def get_url_fetcher(request: Request) -> ImageFetcher:
    return _started(request, "url_fetcher")


def get_interactions(request: Request) -> Interactions | None:
    return getattr(request.app.state, "interactions", None)


def get_jobs(request: Request) -> JobClient:
    return _started(request, "jobs")


def _started(request: Request, name: str):
    value = getattr(request.app.state, name, None)
    if value is None:  # set by the app's start-up (lifespan)
        raise api_error(503, "not_started", "the API has not started")
    return value


SearcherDep = Annotated[Searcher, Depends(get_searcher)]
BodyTimeoutsDep = Annotated[BodyTimeouts, Depends(get_body_timeouts)]
DecodeSlotsDep = Annotated[DecodeSlots, Depends(get_decode_slots)]
FetcherDep = Annotated[ImageFetcher, Depends(get_url_fetcher)]
JobsDep = Annotated[JobClient, Depends(get_jobs)]
InteractionsDep = Annotated[Interactions | None, Depends(get_interactions)]
LimitQ = Annotated[int, Query(ge=1, le=MAX_LIMIT)]
# base64 makes a photo 4/3 larger; the JSON around it is small
_JSON_OVERHEAD = 64 * 1024


@router.post("/search", response_model=SearchResponse)
async def search(request: Request, response: Response, searcher: SearcherDep, timeouts: BodyTimeoutsDep,
                 slots: DecodeSlotsDep, fetcher: FetcherDep, interactions: InteractionsDep, limit: LimitQ = 10,
                 objects: Annotated[int, Query(ge=1, le=MAX_OBJECTS)] = 1) -> SearchResponse:
    QUERIES.labels("search").inc()
    request_id = uuid.uuid4().hex
    response.headers["X-Request-ID"] = request_id
    # The body first, the slot after: a slow client holds no decode slot.
    cap = searcher.max_image_bytes * 4 // 3 + _JSON_OVERHEAD
    body = await read_body(request, max_bytes=cap, timeouts=timeouts)
    try:
        inp = parse_search(request.headers.get("content-type", ""), body, limit=limit, objects=objects)
    except BadInput as e:
        QUERY_ERRORS.labels(e.reason).inc()
        raise api_error(e.status, e.reason, e.detail) from None
    text = (inp.text or "").strip() or None
    if text is not None and not searcher.serves_text:
        QUERY_ERRORS.labels("text_unsupported").inc()
        raise api_error(422, "text_unsupported", "text and image+text search need the items' title vectors, which "
                        "the serving generation does not hold (built without the text model); send an image alone")
    image = inp.image
    if inp.image_url is not None:
        image = await run_in_threadpool(_fetch, fetcher, inp.image_url)
    if image is not None and len(image) > searcher.max_image_bytes:
        raise api_error(413, "too_large", f"the image is {len(image)} bytes; the limit is {searcher.max_image_bytes}")
    try:
        if image is None and text is not None:  # text alone: no image to decode, no decode slot
            resp = await run_in_threadpool(searcher.search_text, text, limit=inp.limit, filters=inp.filters)
        else:
            async with slots.hold():
                resp = await run_in_threadpool(searcher.search_bytes, image or b"", limit=inp.limit,
                                               max_objects=inp.objects, filters=inp.filters, text=text,
                                               explain=inp.explain)
    except ImageError as e:
        raise api_error(422, e.reason, e.detail) from e
    except TextUnsupportedError as e:
        raise api_error(422, "text_unsupported", str(e)) from e
    except IndexBackendError as e:
        raise _index_down(e) from e
    resp.request_id = request_id
    if interactions is not None:  # never fails the search (query.interactions)
        await run_in_threadpool(interactions.shown, resp, query_id(image, text))
    return resp


@router.post("/feedback", response_model=FeedbackOut, status_code=202)
def feedback(body: FeedbackRequest, interactions: InteractionsDep) -> FeedbackOut:
    """Record a click, add-to-cart or order against a search's request id (``search.interactions``)."""
    QUERIES.labels("feedback").inc()
    if interactions is None:
        raise api_error(503, "interactions_off", "this process records no interactions "
                        "(TONGKUAN_INTERACTIONS__SINK=off)")
    try:
        event = interactions.engaged(body.request_id, body.item_id, body.kind, amount=body.amount,
                                     event_id=body.event_id, event_time=body.event_time)
    except UnknownRequest:
        raise api_error(404, "unknown_request", f"no recent search {body.request_id!r} (unknown, or older than "
                        "the ledger keeps)") from None
    except NotShown as e:
        raise api_error(422, "not_shown", str(e)) from None
    except ValidationError as e:
        raise api_error(422, "invalid_request", "; ".join(err["msg"] for err in e.errors())) from None
    except Exception as e:  # noqa: BLE001 - the sink refused: nothing was recorded, the caller may retry
        QUERY_ERRORS.labels("interactions_unavailable").inc()
        raise api_error(503, "interactions_unavailable", f"{type(e).__name__}: {e}") from None
    return FeedbackOut(event_id=event.event_id, request_id=event.request_id, kind=event.kind)


def _fetch(fetcher: ImageFetcher, url: str) -> bytes:
    """A shopper's image URL: http(s) only (never an object key or a path of this server)."""
    try:
        ref = normalize_ref(url)
    except (UnsupportedScheme, ValueError) as e:
        raise api_error(422, "bad_url", str(e)) from None
    if not ref.startswith(("http://", "https://")):
        raise api_error(422, "bad_scheme", "image_url must be an http(s) URL")
    try:
        return fetcher.fetch(ref)
    except FetchError as e:
        QUERY_ERRORS.labels(f"fetch_{e.reason}").inc()
        # The image's server timed out or failed (retry may work): 502; a URL that cannot work: 422.
        raise api_error(502 if e.transient else 422, e.reason, f"image_url could not be used: {e.detail}") from None


def _index_down(e: IndexBackendError) -> HTTPException:
    QUERY_ERRORS.labels("index_unavailable").inc()
    return api_error(503, "index_unavailable", f"the index did not answer: {e}", headers={"Retry-After": "1"})


# Before /items/{id}: the path converter lets ids hold "/", and this route must win for ".../similar".
@router.get("/items/{item_id:path}/similar", response_model=list[SearchHit])
def similar(item_id: str, searcher: SearcherDep, limit: LimitQ = 10) -> list[SearchHit]:
    QUERIES.labels("similar").inc()
    try:
        return searcher.similar_items(item_id, limit=limit)
    except UnknownItemError:
        raise api_error(404, "unknown_item", f"no indexed item {item_id!r}") from None
    except IndexBackendError as e:
        raise _index_down(e) from e


@router.get("/items/{item_id:path}", response_model=ItemOut)
def item(item_id: str, searcher: SearcherDep) -> ItemOut:
    QUERIES.labels("item").inc()
    try:
        return searcher.item(item_id)
    except UnknownItemError:
        raise api_error(404, "unknown_item", f"no indexed item {item_id!r}") from None
    except IndexBackendError as e:
        raise _index_down(e) from e


# -- bulk similar items (query.jobs) ------------------------------------------------------------------
_JOB_ID = re.compile(r"[0-9a-f]{32}")


@router.post("/similar/bulk", status_code=202)
def similar_bulk(req: BulkSimilarRequest, jobs: JobsDep) -> dict[str, str]:
    """Similar items for a list of ids or a category, as a job writing JSONL (for recommenders)."""
    QUERIES.labels("similar_bulk").inc()
    try:
        job_id = jobs.submit(req)
    except Exception as e:  # noqa: BLE001 - Redis or the broker down: nothing was queued
        raise api_error(503, "queue_unavailable", f"the job could not be queued: {type(e).__name__}: {e}",
                        headers={"Retry-After": "5"}) from e
    return {"job_id": job_id, "status": "queued", "status_url": f"/v1/jobs/{job_id}"}


def _job(jobs: JobClient, job_id: str) -> dict:
    status = jobs.status(job_id) if _JOB_ID.fullmatch(job_id) else None
    if status is None:
        raise api_error(404, "unknown_job", f"no job {job_id!r} (never submitted, or expired)")
    return status


@router.get("/jobs/{job_id}")
def job_status(job_id: str, jobs: JobsDep) -> dict:
    """``queued`` / ``running`` / ``done`` (with counts and the result's location) / ``failed``."""
    return _job(jobs, job_id)


@router.get("/jobs/{job_id}/result", response_class=FileResponse)
def job_result(job_id: str, jobs: JobsDep) -> FileResponse:
    status = _job(jobs, job_id)
    if status["status"] != "done":
        raise api_error(409, "not_ready", f"job {job_id} is {status['status']}")
    path = result_path(jobs.dir, job_id)
    if not path.is_file():
        raise api_error(410, "result_gone", f"job {job_id}'s result is no longer on disk")
    return FileResponse(path, media_type="application/x-ndjson", filename=f"similar-{job_id}.jsonl")
