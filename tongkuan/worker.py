"""The ingest worker process: ``celery -A tongkuan.worker worker`` (pool and concurrency from
``TONGKUAN_WORKER__*``; Celery's own flags override them).

The configuration (``tongkuan.config.WorkerConfig``) is read when the worker starts: the Celery app
asks for it when it first needs its settings, and the runtime (models, index targets, fetcher,
dead-letter producer) is built when the pool is ready (solo, threads) or in each prefork child.
With ``TONGKUAN_WORKER__INDEX_READ_PORT`` the runtime also serves reads of the index it owns
(``index.remote``): that is how the API searches the embedded index while this worker ingests.
"""

from __future__ import annotations

import logging
from functools import lru_cache

from celery import signals

from events.bus import LazyProducer
from tongkuan.config import WorkerConfig, load
from workers import metrics, runtime
from workers.celery_app import celery_config, create_app

log = logging.getLogger(__name__)


@lru_cache(maxsize=1)
def config() -> WorkerConfig:
    return load(WorkerConfig)


app = create_app(lambda: celery_config(config().celery, config().worker))


def build() -> runtime.WorkerRuntime:
    from events.kafka import make_producer
    from vision.registry import ModelRegistry

    c = config()
    return runtime.build_runtime(
        worker=c.worker, runtime=c.runtime, image=c.image, index=c.index, fetch=c.fetch,
        dead_letters=LazyProducer(lambda: make_producer(c.kafka)),
        activator=ModelRegistry(c.runtime.model_dir) if c.worker.embedder == "onnx" else None,
    )


runtime.install(build)


# solo and prefork send worker_process_init in the process that runs tasks; the threads pool does
# not, so worker_ready (main process, pool started) covers it. Both paths are idempotent per process.


@signals.worker_process_init.connect
def _on_process_init(**_: object) -> None:
    metrics.start_worker_metrics(config().worker, config().celery, child=True)
    if config().worker.index_read_port:  # prefork: the child owns the index, so it serves the reads
        runtime.current()


@signals.worker_ready.connect
def _on_ready(sender=None, **_: object) -> None:
    c = config()
    pool = type(getattr(sender, "pool", None)).__module__.rsplit(".", 1)[-1]  # solo / thread / prefork
    concurrency = getattr(getattr(sender, "pool", None), "limit", None) or c.worker.concurrency
    try:
        runtime.check_layout(c.index, c.worker, "threads" if pool == "thread" else pool, int(concurrency))
    except RuntimeError as e:
        # Celery logs and swallows exceptions from signal handlers; SystemExit stops the worker.
        log.critical("%s", e)
        raise SystemExit(2) from e
    if c.environment == "development":
        log.warning("TONGKUAN_ENVIRONMENT=development: production checks are relaxed")
    if pool == "thread":
        metrics.start_worker_metrics(c.worker, c.celery, child=False)
    if pool == "prefork":  # prefork children load on their first task (or at init, serving reads)
        return
    if c.worker.index_read_port:  # the runtime starts the index read service: search works from now on
        runtime.current()
    if c.worker.warmup:
        rt = runtime.current()
        seconds = runtime.warm_up(rt)
        log.info("model warmed up in %.2fs (%d tasks at once)", seconds, rt.tasks_at_once)
