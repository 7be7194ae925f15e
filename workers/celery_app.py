"""The Celery app: Redis broker and result backend, JSON only. This module only builds the app.

Start a worker (the pool and concurrency come from ``WorkerSettings``; CLI flags override them)::

    celery -A workers.celery_app worker --loglevel=INFO

Who owns the index: the embedded Qdrant Edge index (``index_backend=edge``, the default) is a
directory that one process may open at a time. So in embedded mode exactly one worker *process*
runs tasks: ``worker_pool=solo`` (default) or ``threads`` (tasks share the process's index, whose
writes are serialised by its lock), or ``prefork`` with ``worker_concurrency=1`` (the one child owns
it). More processes need the Qdrant server (``index_backend=qdrant``): ``prefork`` with any
concurrency, and more worker containers. ``check_pool`` refuses other combinations at start-up.
"""

from __future__ import annotations

import importlib
import logging
from functools import lru_cache
from typing import Any, Literal

from celery import Celery, signals
from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from events.topics import CATALOG_ITEMS_DLQ

log = logging.getLogger(__name__)

APPLY_EVENTS_TASK = "tongkuan.apply_catalog_events"
Pool = Literal["solo", "threads", "prefork"]


def load_ref(ref: str) -> Any:
    """The object a ``"module:attr.attr"`` reference names (the factories in ``WorkerSettings``)."""
    module, _, attr = ref.partition(":")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


class WorkerSettings(BaseSettings):
    """Celery worker settings (env prefix ``TONGKUAN_``). Index, model and fetch limits stay in
    ``tongkuan.settings.Settings``."""

    model_config = SettingsConfigDict(env_prefix="TONGKUAN_", extra="ignore")

    broker_url: str = "redis://127.0.0.1:6379/0"
    # Empty = the broker URL.
    result_backend: str = ""
    ingest_queue: str = "tongkuan.ingest"

    worker_pool: Pool = "solo"
    worker_concurrency: int = Field(default=1, ge=1, le=64)
    # Messages a worker reserves per task slot (Celery's worker_prefetch_multiplier). With 1 and
    # acks_late, a slot that finishes a task has nothing reserved: the next message is fetched
    # from Redis only after the ack, and the slot waited 13-14 ms per task for it (median of the
    # task spans in a bench-ingest round; 6 ms with 2). The cost of 2: one more task per slot
    # waits in this worker while another worker might be idle, a task's length (~1.5 s) at most.
    prefetch_multiplier: int = Field(default=2, ge=1, le=16)

    # Redis redelivers a message that was not acked within this time to another worker. With
    # acks_late a task is acked when it ends, so this must exceed the longest task *and* the longest
    # retry countdown (a retried task waits unacked in the worker), or it runs twice meanwhile.
    visibility_timeout_s: int = Field(default=3600, ge=60)
    result_expires_s: int = Field(default=24 * 3600, ge=60)
    # Hard limit per task: a wedged fetch or model call cannot hold the worker for ever.
    task_time_limit_s: int = Field(default=600, ge=10)

    # Transient failures (timeouts, 5xx, broker/DLQ unavailable): retry with exponential backoff
    # ``retry_backoff_s * 2**n`` capped at ``retry_backoff_max_s``, then dead-letter (per item)
    # or fail (whole task).
    task_max_retries: int = Field(default=5, ge=0, le=50)
    retry_backoff_s: float = Field(default=1.0, gt=0)
    retry_backoff_max_s: float = Field(default=60.0, gt=0)

    # /metrics (prometheus-client). 0 = off. A prefork child serves ``metrics_port + child index``.
    # Build the index's HNSW graph every N writes (Edge has no background optimizer; 0 = never).
    optimize_every: int = Field(default=5000, ge=0)
    metrics_port: int = Field(default=9102, ge=0, le=65535)
    metrics_addr: str = "127.0.0.1"

    dlq_topic: str = CATALOG_ITEMS_DLQ
    # Factories, as "module:attribute" (tests and the demo substitute their own):
    #   embedder(settings) -> CatalogEmbedder; index(settings, dim, *, model_id) -> VectorIndex;
    #   dlq(settings, worker_settings) -> publisher with publish(topic, key, value, headers) + flush().
    embedder_factory: str = "vision.runtime:VisionPipeline.from_settings"
    index_factory: str = "index.factory:open_index"
    dlq_factory: str = "workers.tasks:kafka_dead_letters"
    # Load the model and open the index when the worker starts rather than on the first task.
    warmup: bool = True

    @model_validator(mode="after")
    def _backoff_order(self) -> WorkerSettings:
        if self.retry_backoff_max_s < self.retry_backoff_s:
            raise ValueError("retry_backoff_max_s must be >= retry_backoff_s")
        if self.retry_backoff_max_s >= self.visibility_timeout_s:
            raise ValueError("retry_backoff_max_s must be < visibility_timeout_s (see its comment)")
        return self


@lru_cache(maxsize=1)
def get_worker_settings() -> WorkerSettings:
    return WorkerSettings()


def check_pool(index_backend: str, pool: str, concurrency: int) -> None:
    """Refuse pool layouts where several processes would open the embedded index."""
    if index_backend == "edge" and pool == "prefork" and concurrency > 1:
        raise RuntimeError(
            "the embedded (edge) index is owned by one process: use worker_pool=solo or threads, "
            "or prefork with worker_concurrency=1; several processes need index_backend=qdrant"
        )


def create_app(ws: WorkerSettings | None = None) -> Celery:
    ws = ws or get_worker_settings()
    app = Celery("tongkuan", broker=ws.broker_url, backend=ws.result_backend or ws.broker_url,
                 include=["workers.tasks", "workers.reembed"])
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_default_queue=ws.ingest_queue,
        task_routes={APPLY_EVENTS_TASK: {"queue": ws.ingest_queue}},
        # Ack after the task ends, and give the message back if the worker process dies mid-task.
        # Cost: a task may run twice (worker killed after its writes, before its ack), so tasks must
        # be idempotent. They are: point ids derive from item ids, writes are version-guarded
        # (an equal version overwrites with the same content, an older one is skipped), and a
        # repeated dead letter is a duplicate record on the DLQ topic, never a lost event.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # Reserved messages per task slot (see WorkerSettings.prefetch_multiplier).
        worker_prefetch_multiplier=ws.prefetch_multiplier,
        worker_pool=ws.worker_pool,
        worker_concurrency=ws.worker_concurrency,
        task_time_limit=ws.task_time_limit_s,
        broker_transport_options={"visibility_timeout": ws.visibility_timeout_s},
        result_backend_transport_options={"visibility_timeout": ws.visibility_timeout_s},
        result_expires=ws.result_expires_s,
        # Results hold the task's outcome only: extended results would store each task's 64
        # events again with it, encoded by the worker and decoded on every readiness check of
        # the dispatcher.
        result_extended=False,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    return app


app = create_app()


# --- worker process lifecycle (handlers live in workers.tasks / workers.metrics) -------------------
#
# solo and prefork send worker_process_init in the process that runs tasks; the threads pool does
# not, so worker_ready (main process, pool started) covers it. Both paths are idempotent per process.


@signals.worker_process_init.connect
def _on_process_init(**_: object) -> None:
    from workers import metrics

    metrics.start_worker_metrics(get_worker_settings(), child=True)


@signals.worker_ready.connect
def _on_ready(sender=None, **_: object) -> None:
    from workers import metrics, tasks

    ws = get_worker_settings()
    pool = type(getattr(sender, "pool", None)).__module__.rsplit(".", 1)[-1]  # solo/thread/prefork
    concurrency = getattr(getattr(sender, "pool", None), "limit", None) or ws.worker_concurrency
    try:
        tasks.check_worker_pool(pool, int(concurrency))
    except RuntimeError as e:
        # Celery logs and swallows exceptions from signal handlers; SystemExit stops the worker.
        log.critical("%s", e)
        raise SystemExit(2) from e
    if pool == "thread":
        metrics.start_worker_metrics(ws, child=False)
    if ws.warmup and pool != "prefork":  # prefork children load on their first task
        runtime = tasks.get_runtime()
        seconds = tasks.warm_up(runtime)
        log.info("model warmed up in %.2fs (%d tasks at once)", seconds, runtime.tasks_at_once)
