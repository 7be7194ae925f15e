"""Settings of the catalog side: the Celery connection, the ingest worker, the dispatcher.

Plain typed models; the composition root (``tongkuan.config``) reads them from the environment as
``TONGKUAN_CELERY__*``, ``TONGKUAN_WORKER__*`` and ``TONGKUAN_DISPATCHER__*`` when a process starts.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from events.topics import CATALOG_FEATURES, CATALOG_ITEMS, CATALOG_ITEMS_DLQ

Pool = Literal["solo", "threads", "prefork"]


class _Component(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CelerySettings(_Component):
    """The task queue, shared by the worker (runs tasks) and the dispatcher (sends them)."""

    broker_url: str = Field(default="redis://127.0.0.1:6379/0", description="Celery broker (Redis)")
    result_backend: str = Field(default="", description="task results; empty = the broker URL")
    queue: str = Field(default="tongkuan.ingest", description="queue of the ingest tasks")
    # Redis redelivers a message that was not acked within this time to another worker. With
    # acks_late a task is acked when it ends, so this must exceed the longest task *and* the longest
    # retry countdown (a retried task waits unacked in the worker), or it runs twice meanwhile.
    visibility_timeout_s: int = Field(default=3600, ge=60, description="unacked message redelivered after this")
    result_expires_s: int = Field(default=24 * 3600, ge=60, description="results kept this long")


class WorkerSettings(_Component):
    """The ingest worker process: Celery pool, retries, the embedding layout."""

    pool: Pool = Field(default="solo", description="Celery pool; the embedded index allows one process")
    concurrency: int = Field(default=1, ge=1, le=64, description="tasks at once (threads) or children (prefork)")
    # With 1 and acks_late, a slot that finishes a task has nothing reserved: the next message is
    # fetched from Redis only after the ack, and the slot waited 13-14 ms per task for it (median of
    # the task spans in a bench-ingest round; 6 ms with 2). The cost of 2: one more task per slot
    # waits in this worker while another worker might be idle, a task's length (~1.5 s) at most.
    prefetch_multiplier: int = Field(default=2, ge=1, le=16, description="messages reserved per task slot")
    # Below the dispatcher's task_timeout_s (300 s): a task that hangs is killed and answers with an
    # error (its events then go through the dispatcher's isolation), instead of leaving no answer.
    task_time_limit_s: int = Field(default=240, ge=10, description="hard limit per task run (keep below the "
                                   "dispatcher's task_timeout_s)")
    # Transient failures (timeouts, 5xx, broker/DLQ unavailable): retry with exponential backoff
    # retry_backoff_s * 2**n capped at retry_backoff_max_s, then dead-letter (per item) or fail.
    task_max_retries: int = Field(default=5, ge=0, le=50, description="retries of a task's transient failures")
    retry_backoff_s: float = Field(default=1.0, gt=0, description="first retry's delay (doubles)")
    retry_backoff_max_s: float = Field(default=60.0, gt=0, description="longest retry delay")
    # Qdrant Edge has no background optimizer: new points are searched by brute force until the
    # graph is built, so the worker builds it every N writes.
    optimize_every: int = Field(default=5000, ge=0, description="build the HNSW graph every N writes (0: never)")
    metrics_port: int = Field(default=9102, ge=0, le=65535, description="/metrics port (prefork child: + index; 0: off)")
    metrics_addr: str = Field(default="127.0.0.1", description="/metrics address")
    # The embedded index has one owner, this process: the API searches it through this port
    # (index.remote), so search runs while the worker ingests. Loopback only by default.
    index_read_port: int = Field(default=0, ge=0, le=65535, description="serve reads of the index this worker "
                                 "owns (the API's TONGKUAN_API__INDEX_OWNER_URL points here; 0: off)")
    index_read_addr: str = Field(default="127.0.0.1", description="address of the index read service")
    warmup: bool = Field(default=True, description="load the model and run it before the first task")
    embedder: Literal["onnx", "thumbnail"] = Field(default="onnx", description="onnx: the registry's model; "
                                                   "thumbnail: a cheap stand-in for drills and tests")
    dlq_topic: str = Field(default=CATALOG_ITEMS_DLQ, description="dead-letter topic")
    ingest_batch_size: int = Field(default=32, ge=1, le=1024, description="pictures per model run")
    # On the 2-core dev machine 2 streams ran the model alone 13-25 % faster but ingest no faster end
    # to end, at 3x the latency (make bench-ingest --streams 2, docs/ingest-performance.md).
    ingest_streams: int = Field(default=1, ge=1, le=16, description="chunks of one task embedded at once")
    # In process on the 2-core dev machine, 2 processes reached 0.93 of the model-only ceiling
    # against 0.89 for 2 task threads (bench-ingest --in-process, docs/ingest-performance.md).
    ingest_processes: int = Field(default=0, ge=0, le=64, description="embedding processes (0: embed on "
                                  "the task threads)")

    @model_validator(mode="after")
    def _backoff_order(self) -> WorkerSettings:
        if self.retry_backoff_max_s < self.retry_backoff_s:
            raise ValueError("retry_backoff_max_s must be >= retry_backoff_s")
        return self

    @property
    def tasks_at_once(self) -> int:
        """Tasks this worker runs at the same time, each with its own model run."""
        return 1 if self.pool == "solo" else self.concurrency


class DispatcherSettings(_Component):
    """``catalog.items`` → batched Celery tasks (``workers.dispatcher``)."""

    group_id: str = Field(default="tongkuan-dispatcher", description="Kafka consumer group")
    topic: str = Field(default=CATALOG_ITEMS, description="topic of the state events")
    dlq_topic: str = Field(default=CATALOG_ITEMS_DLQ, description="dead-letter topic")
    features_topic: str = Field(default=CATALOG_FEATURES, description="where feature events found on the "
                                "state topic are forwarded (the embedding workers never see them)")
    max_batch: int = Field(default=64, ge=1, le=10_000, description="a batch closes at this many records")
    max_wait_ms: int = Field(default=200, ge=0, description="... or this long after its first record")
    task_chunk: int = Field(default=64, ge=1, description="events per task at most (tasks of near-equal size)")
    # 2 keeps the worker busy while the dispatcher commits one batch and gathers the next; an item is
    # never in two in-flight batches, so one writer per item.
    max_in_flight: int = Field(default=2, ge=1, le=16, description="batches queued or running at once")
    # Must exceed a worker's longest batch, including its own retries, or work is duplicated.
    # A task that has not answered says nothing about its events: its batch is re-sent, never
    # dead-lettered. So this must exceed a task's longest retry chain on the worker (fetch total
    # timeouts x (task_max_retries + 1) + the backoffs: about 211 s with the defaults), and the
    # worker's task_time_limit_s turns a run that hangs into an answer (an error).
    task_timeout_s: float = Field(default=300.0, gt=0, description="a task not done by then fails its batch "
                                  "(keep above the worker's longest retry chain)")
    tick_s: float = Field(default=0.05, gt=0, le=1.0, description="how often in-flight tasks are checked")
    keepalive_poll_s: float = Field(default=1.0, gt=0, le=60.0, description="paused consumer polled this often")
    retry_backoff_s: float = Field(default=0.5, gt=0, description="first delay before a failed batch is re-sent")
    # With the default backoff (0.5 s doubling to 30 s) five attempts take about 15 s: a broker outage
    # shorter than that costs nothing; past it, events that cannot be processed on their own move to
    # the dead-letter topic (replayable from there) and the partition moves on.
    max_batch_attempts: int = Field(default=5, ge=1, le=100, description="a batch that failed this often is sent "
                                    "one task per event; an event that fails alone is dead-lettered")
    retry_backoff_max_s: float = Field(default=30.0, gt=0, description="longest delay")
    shutdown_grace_s: float = Field(default=5.0, ge=0, description="on SIGTERM, how long in-flight batches may finish")
    dlq_flush_timeout_s: float = Field(default=10.0, gt=0, description="dead letters acknowledged within this")
    metrics_port: int = Field(default=9103, ge=0, le=65535, description="/metrics port (0: off)")
    metrics_addr: str = Field(default="127.0.0.1", description="/metrics address")
