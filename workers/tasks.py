"""The Celery tasks of the catalog side, thin: decode the message, call the batch logic, retry.

* ``tongkuan.apply_catalog_events(events, carried=None) -> dict``: one dispatcher batch
  (``events.contract.encode_task``) → ``workers.batch.apply_batch``. Item-level transient failures
  retry the task for just those events with exponential backoff; earlier results ride along in
  ``carried``, so the final result covers the whole batch. Whole-batch transient errors (dead-letter
  topic or index unreachable, a required target generation failing, an embedding process dying)
  retry the whole batch. Settings (retries, backoff) are read from the worker's runtime when a task
  runs, not when this module is imported.
* ``tongkuan.reembed_batch(model_name, items) -> dict``: one page of a blue/green re-embed.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Mapping

from celery import shared_task

from events.contract import decode_task, encode_task
from events.item import CatalogItem
from index.base import IndexBackendError
from workers import metrics, runtime
from workers.batch import DeadLetterUnavailable, apply_batch
from workers.celery_app import APPLY_EVENTS_TASK, REEMBED_TASK
from workers.embed_pool import EmbedPoolBroken
from workers.pipeline import TargetWriteError
from workers.reembed import reembed_items
from workers.settings import WorkerSettings

log = logging.getLogger(__name__)

# Whole-batch failures worth a retry (idempotent: the batch may run again in full).
BATCH_TRANSIENT = (DeadLetterUnavailable, IndexBackendError, TargetWriteError, EmbedPoolBroken, ConnectionError,
                   TimeoutError)


def backoff_s(retries: int, ws: WorkerSettings) -> float:
    """``retry_backoff_s * 2**retries`` capped at ``retry_backoff_max_s``, with full jitter on its upper half."""
    delay = min(ws.retry_backoff_max_s, ws.retry_backoff_s * (2 ** retries))
    return delay * random.uniform(0.5, 1.0)


def _merge(carried: Mapping[str, list] | None, result: dict[str, list]) -> dict[str, list]:
    if not carried:
        return result
    return {k: list(carried.get(k, [])) + v for k, v in result.items()}


@shared_task(name=APPLY_EVENTS_TASK, bind=True)
def apply_catalog_events(self, events: list[dict], carried: dict | None = None) -> dict:
    """Apply one batch of catalog events. ``carried``: results of earlier attempts (internal)."""
    rt = runtime.current()
    ws = rt.worker
    retries = self.request.retries or 0
    sourced, rejected = decode_task(events)
    t0 = time.perf_counter()
    try:
        outcome = apply_batch(sourced, rt, final_attempt=retries >= ws.task_max_retries, attempt=retries + 1,
                              rejected=rejected)
    except BATCH_TRANSIENT as e:
        metrics.TASKS.labels(status="error").inc()
        log.warning("batch of %d events failed (%s), retry %d of %d", len(events), e, retries + 1, ws.task_max_retries)
        raise self.retry(exc=e, countdown=backoff_s(retries, ws), max_retries=ws.task_max_retries) from e
    except Exception:
        metrics.TASKS.labels(status="error").inc()
        raise
    finally:
        metrics.TASK_SECONDS.observe(time.perf_counter() - t0)
    result = _merge(carried, outcome.result())
    if outcome.retry:
        metrics.TASKS.labels(status="retry").inc()
        countdown = backoff_s(retries, ws)
        log.info("retrying %d events (%s) in %.1fs", len(outcome.retry), ",".join(sorted(set(outcome.retry_reasons))),
                 countdown)
        raise self.retry(args=(encode_task(outcome.retry),), kwargs={"carried": result}, countdown=countdown,
                         max_retries=ws.task_max_retries)
    metrics.TASKS.labels(status="success").inc()
    return result


@shared_task(name=REEMBED_TASK, bind=True)
def reembed_batch(self, model_name: str, items: list[dict]) -> dict:
    """Re-embed one page of catalog items (``CatalogItem`` JSON) with ``model_name``."""
    rt = runtime.current()
    try:
        return reembed_items([CatalogItem.model_validate(d) for d in items], model_name=model_name, runtime=rt)
    except BATCH_TRANSIENT as e:
        raise self.retry(exc=e, countdown=backoff_s(self.request.retries or 0, rt.worker),
                         max_retries=rt.worker.task_max_retries) from e
