"""Bulk similar items for recommenders: a Celery job that writes JSONL.

``POST /v1/similar/bulk`` (``query.http``) records the job (``JobStore``, in Redis, for
``GET /v1/jobs/{id}``) and sends ``tongkuan.similar_bulk`` by name; a worker runs it — in the
embedded mode the worker that owns the index, which is why this is a task and not a thread of the
API. The job reads the serving generation, and for each item (a list of ids, or every item under a
category path prefix) writes one line::

    {"item_id": ..., "similar": [{"item_id", "score", "title", "category_path", "duplicates"}]}

with the same rule as ``GET /v1/items/{id}/similar`` (``query.searcher.similar_to``: the item and
its near duplicates left out); ids that are not indexed get ``{"item_id": ..., "error": "unknown_item"}``.
The file is ``<jobs dir>/<job id>.jsonl``, written to a temporary name and renamed when complete,
so a reader never sees half a result; the API serves it at ``GET /v1/jobs/{id}/result`` (the
worker and the API share the jobs directory: one machine, or a shared volume).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from celery import shared_task
from pydantic import BaseModel, ConfigDict, Field, model_validator

from index.base import VectorIndex
from query.searcher import CATEGORY_PREFIXES_KEY, similar_to
from workers.celery_app import SIMILAR_BULK_TASK

MAX_IDS = 10_000


class BulkSimilarRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    item_ids: list[str] | None = Field(default=None, min_length=1, max_length=MAX_IDS)
    category: str | None = Field(default=None, min_length=1, max_length=512, description="every item under this "
                                 "category path prefix ('Fruit' or 'Fruit/Apple')")
    limit: int = Field(default=10, ge=1, le=100, description="similar items per item")

    @model_validator(mode="after")
    def _one_source(self) -> BulkSimilarRequest:
        if (self.item_ids is None) == (self.category is None):
            raise ValueError("give item_ids or category (one of them)")
        return self


def category_items(index: VectorIndex, category: str) -> Iterator[str]:
    """Ids of the live items under ``category`` (a path prefix): its top-level shard, scanned."""
    parts = category.split("/")
    if parts[0] not in index.shards():
        return
    for page in index.scan(shard=parts[0]):
        for rec in page:
            if len(parts) == 1 or category in rec.payload.get(CATEGORY_PREFIXES_KEY, []):
                yield rec.item_id


def write_similar(index: VectorIndex, item_ids: Iterator[str] | list[str], limit: int, out: Path) -> dict[str, Any]:
    """The JSONL for ``item_ids`` at ``out`` (atomically); returns counts."""
    from query.searcher import UnknownItemError

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".jsonl.partial")
    n = unknown = 0
    t0 = time.perf_counter()
    with open(tmp, "w", encoding="utf-8") as f:
        for item_id in item_ids:
            try:
                hits = similar_to(index, item_id, limit=limit)
                line = {"item_id": item_id, "similar": [h.model_dump(include={"item_id", "score", "title",
                                                                              "category_path", "duplicates"})
                                                        for h in hits]}
            except UnknownItemError:
                line = {"item_id": item_id, "error": "unknown_item"}
                unknown += 1
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
            n += 1
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out)
    return {"items": n, "unknown": unknown, "seconds": round(time.perf_counter() - t0, 3)}


def result_path(jobs_dir: Path, job_id: str) -> Path:
    return Path(jobs_dir) / f"{job_id}.jsonl"


@shared_task(name=SIMILAR_BULK_TASK)
def similar_bulk(job_id: str, request: dict[str, Any], jobs_dir: str) -> dict[str, Any]:
    """Run one bulk job on this worker's serving generation."""
    from workers import runtime

    req = BulkSimilarRequest.model_validate(request)
    rt = runtime.current()
    serving = rt.manager.serving()
    if serving is None:
        raise RuntimeError("no serving generation")
    with rt.manager.opened(serving) as index:  # the worker's shared handle
        ids = req.item_ids if req.item_ids is not None else category_items(index, req.category or "")
        counts = write_similar(index, ids, req.limit, result_path(Path(jobs_dir), job_id))
    return {**counts, "model_id": serving}


class JobStore:
    """Which job ids exist (Celery answers PENDING for any id, known or not): one Redis key per job."""

    PREFIX = "tongkuan:job:"

    def __init__(self, redis_client: Any, ttl_s: int):
        self.redis, self.ttl_s = redis_client, ttl_s

    def add(self, job_id: str, request: dict[str, Any]) -> None:
        self.redis.set(self.PREFIX + job_id, json.dumps({"request": request, "submitted_at": time.time()}),
                       ex=self.ttl_s)

    def get(self, job_id: str) -> dict[str, Any] | None:
        raw = self.redis.get(self.PREFIX + job_id)
        return json.loads(raw) if raw else None


class JobClient:
    """The API's side: submit a job (recorded, then sent by name) and read its status."""

    def __init__(self, celery_app: Any, store: JobStore, jobs_dir: Path):
        self.celery, self.store, self.dir = celery_app, store, Path(jobs_dir)

    def submit(self, request: BulkSimilarRequest) -> str:
        job_id = uuid.uuid4().hex
        body = request.model_dump(exclude_none=True)
        self.store.add(job_id, body)
        self.celery.send_task(SIMILAR_BULK_TASK, args=[job_id, body, str(self.dir)], task_id=job_id)
        return job_id

    def status(self, job_id: str) -> dict[str, Any] | None:
        """None for an id never submitted (or expired); else state, the result's counts or the error."""
        record = self.store.get(job_id)
        if record is None:
            return None
        res = self.celery.AsyncResult(job_id)
        state = {"PENDING": "queued", "RECEIVED": "queued", "STARTED": "running", "RETRY": "running",
                 "SUCCESS": "done", "FAILURE": "failed", "REVOKED": "failed"}.get(res.state, res.state.lower())
        out: dict[str, Any] = {"job_id": job_id, "status": state, "request": record["request"],
                               "submitted_at": record["submitted_at"]}
        if state == "done":
            out["result"] = {**res.result, "location": f"/v1/jobs/{job_id}/result"}
        elif state == "failed":
            out["error"] = f"{type(res.result).__name__}: {res.result}"
        return out


__all__ = ["BulkSimilarRequest", "JobClient", "JobStore", "category_items", "result_path", "similar_bulk",
           "write_similar"]
