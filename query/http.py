"""HTTP routes of the query side: image search and similar items. Thin: they parse, call ``Searcher``
and map errors to status codes.

* ``POST /v1/search?limit=&objects=`` — body: the photo's bytes (JPEG/PNG/WebP). 413 over the byte
  cap, 408 for a body that stalls or trickles (``query.body``), 422 with the reason code for an image
  that cannot be used (``empty``, ``corrupt``, ``unsupported``, ``too_many_pixels``), 503 with
  ``Retry-After`` when every decode slot stays busy for the queue timeout.
* ``GET /v1/items/{item_id}/similar?limit=`` — for recommenders; 404 for an unknown id.

Both need a key with the ``search`` scope (``query.access``: 401/403/429), checked before the body is
read. ``app.state`` provides ``access``, ``body_timeouts`` and ``decode_slots`` (``tongkuan.api`` sets
them at start-up).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool

from query.access import require
from query.body import BodyTimeouts, read_body
from query.metrics import QUERIES, REJECTED
from query.models import SearchHit, SearchResponse
from query.searcher import Searcher, UnknownItemError
from vision.decode import ImageError

router = APIRouter(prefix="/v1", tags=["query"], dependencies=[Depends(require("search"))])


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
            raise HTTPException(503, f"all {self.limit} decode slots are busy; retry shortly",
                                headers={"Retry-After": str(max(1, math.ceil(self.wait_s)))}) from None
        try:
            yield
        finally:
            self._free.release()


def get_searcher(request: Request) -> Searcher:
    searcher = getattr(request.app.state, "searcher", None)
    if searcher is None:
        raise HTTPException(503, "search is not served by this process (TONGKUAN_API__SERVE_SEARCH=false: "
                                 "the embedded index belongs to the ingest worker; use the Qdrant backend)")
    return searcher


def get_body_timeouts(request: Request) -> BodyTimeouts:
    return _started(request, "body_timeouts")


def get_decode_slots(request: Request) -> DecodeSlots:
    return _started(request, "decode_slots")


def _started(request: Request, name: str):
    value = getattr(request.app.state, name, None)
    if value is None:  # set by the app's start-up (lifespan)
        raise HTTPException(503, "the API has not started")
    return value


SearcherDep = Annotated[Searcher, Depends(get_searcher)]
BodyTimeoutsDep = Annotated[BodyTimeouts, Depends(get_body_timeouts)]
DecodeSlotsDep = Annotated[DecodeSlots, Depends(get_decode_slots)]


@router.post("/search", response_model=SearchResponse)
async def search(
    request: Request,
    searcher: SearcherDep,
    timeouts: BodyTimeoutsDep,
    slots: DecodeSlotsDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 10,
    objects: Annotated[int, Query(ge=1, le=5)] = 1,
) -> SearchResponse:
    QUERIES.labels("search").inc()
    # The body first, the slot after: a slow client holds no decode slot.
    body = await read_body(request, max_bytes=searcher.max_image_bytes, timeouts=timeouts)
    try:
        async with slots.hold():
            return await run_in_threadpool(searcher.search_bytes, body, limit=limit, max_objects=objects)
    except ImageError as e:
        raise HTTPException(422, {"reason": e.reason, "detail": e.detail}) from e


@router.get("/items/{item_id:path}/similar", response_model=list[SearchHit])
def similar(item_id: str, searcher: SearcherDep, limit: Annotated[int, Query(ge=1, le=100)] = 10):
    QUERIES.labels("similar").inc()
    try:
        return searcher.similar_items(item_id, limit=limit)
    except UnknownItemError as e:
        raise HTTPException(404, f"unknown item id: {item_id}") from e
