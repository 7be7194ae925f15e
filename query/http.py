"""HTTP routes of the query side: image search and similar items. Thin: they parse, call ``Searcher``
and map errors to status codes.

* ``POST /v1/search?limit=&objects=`` — body: the photo's bytes (JPEG/PNG/WebP). 413 over the byte
  cap, 422 with the reason code for an image that cannot be used (``empty``, ``corrupt``,
  ``unsupported``, ``too_many_pixels``).
* ``GET /v1/items/{item_id}/similar?limit=`` — for recommenders; 404 for an unknown id.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool

from query.metrics import QUERIES, QUERY_ERRORS
from query.models import SearchHit, SearchResponse
from query.searcher import Searcher, UnknownItemError
from vision.decode import ImageError

router = APIRouter(prefix="/v1", tags=["query"])


def get_searcher(request: Request) -> Searcher:
    searcher = getattr(request.app.state, "searcher", None)
    if searcher is None:
        raise HTTPException(503, "search is not served by this process (TONGKUAN_API__SERVE_SEARCH=false: "
                                 "the embedded index belongs to the ingest worker; use the Qdrant backend)")
    return searcher


SearcherDep = Annotated[Searcher, Depends(get_searcher)]


@router.post("/search", response_model=SearchResponse)
async def search(
    request: Request,
    searcher: SearcherDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 10,
    objects: Annotated[int, Query(ge=1, le=5)] = 1,
) -> SearchResponse:
    QUERIES.labels("search").inc()
    cap = searcher.max_image_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > cap:
        QUERY_ERRORS.labels("too_large").inc()
        raise HTTPException(413, f"image is {declared} bytes; the limit is {cap}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > cap:
            QUERY_ERRORS.labels("too_large").inc()
            raise HTTPException(413, f"image exceeds the limit of {cap} bytes")
    try:
        return await run_in_threadpool(searcher.search_bytes, bytes(body), limit=limit, max_objects=objects)
    except ImageError as e:
        raise HTTPException(422, {"reason": e.reason, "detail": e.detail}) from e


@router.get("/items/{item_id:path}/similar", response_model=list[SearchHit])
def similar(item_id: str, searcher: SearcherDep, limit: Annotated[int, Query(ge=1, le=100)] = 10):
    QUERIES.labels("similar").inc()
    try:
        return searcher.similar_items(item_id, limit=limit)
    except UnknownItemError as e:
        raise HTTPException(404, f"unknown item id: {item_id}") from e
