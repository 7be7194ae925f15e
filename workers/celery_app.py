"""The Celery app: Redis broker and result backend, JSON only. This module only builds the app.

``create_app(config)`` takes the app's configuration as a dict or as a function that returns one;
a function is called when the configuration is first needed (``celery_config`` makes it from the
settings), so building the app reads no settings. Tasks are named here and defined in
``workers.tasks``; whoever sends one (the dispatcher, the re-embed) sends it by name.

Who owns the index: the embedded Qdrant Edge index (``backend=edge``, the default) is a directory
that one process may open at a time. So in embedded mode exactly one worker *process* runs tasks:
the solo pool, the threads pool (tasks share the process's index, whose writes are serialised by
its lock), or prefork with concurrency 1 (the one child owns it). More processes need the Qdrant
server: prefork with any concurrency, and more worker containers (``workers.runtime.check_layout``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from celery import Celery

from workers.settings import CelerySettings, WorkerSettings

APPLY_EVENTS_TASK = "tongkuan.apply_catalog_events"
REEMBED_TASK = "tongkuan.reembed_batch"
SIMILAR_BULK_TASK = "tongkuan.similar_bulk"
# query.jobs: the bulk similar-items job runs where the index is (the embedded index's owner).
TASK_MODULES = ["workers.tasks", "query.jobs"]


def celery_config(celery: CelerySettings, worker: WorkerSettings | None = None) -> dict[str, Any]:
    conf: dict[str, Any] = dict(
        broker_url=celery.broker_url,
        result_backend=celery.result_backend or celery.broker_url,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_default_queue=celery.queue,
        task_routes={name: {"queue": celery.queue} for name in (APPLY_EVENTS_TASK, REEMBED_TASK, SIMILAR_BULK_TASK)},
        # Ack after the task ends, and give the message back if the worker process dies mid-task.
        # Cost: a task may run twice (worker killed after its writes, before its ack), so tasks must
        # be idempotent. They are: point ids derive from item ids, writes are version-guarded
        # (an equal version overwrites with the same content, an older one is skipped), and a
        # repeated dead letter is a duplicate record on the DLQ topic, never a lost event.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        broker_transport_options={"visibility_timeout": celery.visibility_timeout_s},
        result_backend_transport_options={"visibility_timeout": celery.visibility_timeout_s},
        result_expires=celery.result_expires_s,
        # Results hold the task's outcome only: extended results would store each task's 64
        # events again with it, encoded by the worker and decoded on every readiness check of
        # the dispatcher.
        result_extended=False,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    if worker is not None:
        conf.update(
            # Reserved messages per task slot (see WorkerSettings.prefetch_multiplier).
            worker_prefetch_multiplier=worker.prefetch_multiplier,
            worker_pool=worker.pool,
            worker_concurrency=worker.concurrency,
            task_time_limit=worker.task_time_limit_s,
        )
    return conf


def create_app(config: dict[str, Any] | Callable[[], dict[str, Any]], *, tasks: bool = True) -> Celery:
    """The app, configured from ``config`` (a function: when first needed). ``tasks``: include the
    task modules (a worker runs them; a sender only needs their names)."""
    app = Celery("tongkuan", include=TASK_MODULES if tasks else [], set_as_current=tasks)
    app.add_defaults(config)
    return app


__all__ = ["APPLY_EVENTS_TASK", "REEMBED_TASK", "SIMILAR_BULK_TASK", "celery_config", "create_app"]
