"""Prometheus metrics of the catalog workers, and the worker's ``/metrics`` server.

Names (what the Grafana dashboard and ``infra/prometheus.yml`` use; tests/workers check that every
``tongkuan_*`` name there is defined in code):

* ``tongkuan_ingest_event_to_searchable_seconds{op}``  histogram: marketplace event time → the write
  returned from the index (searchable), ``op`` = upsert | delete. Clock skew below 0 counts as 0.
* ``tongkuan_ingest_batch_events``                     histogram: events per task.
* ``tongkuan_ingest_stage_seconds{stage}``             histogram: per batch, from
  ``IngestReport.stage_seconds`` (version_check, fetch, decode, hash, embed, dedup, upsert, delete).
* ``tongkuan_ingest_items_total{outcome}``             counter: indexed, deleted, stale, duplicate,
  dead_lettered, retried, features.
* ``tongkuan_dlq_events_total{reason}``                counter: dead letters by reason code.
* ``tongkuan_ingest_tasks_total{status}``              counter: success, retry (some items retried),
  error (the attempt raised: Celery may retry the whole batch).
* ``tongkuan_ingest_task_seconds``                     histogram: wall time per task attempt.
* ``tongkuan_ingest_target_write_failures_total{role}`` counter: failed writes to a target generation
  (serving | building | previous); a required one fails the batch, an optional one only counts here.
* ``tongkuan_celery_queue_depth{queue}``               gauge, read from Redis (LLEN) at scrape time.
* ``tongkuan_celery_broker_up``                        gauge: 1 if that read worked.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable

from prometheus_client import REGISTRY, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from workers.settings import CelerySettings, WorkerSettings

log = logging.getLogger(__name__)

# Freshness target is p99 <= 1 s (issue 3): resolution where it matters, tail to minutes.
FRESHNESS_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0, 300.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
STAGE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

EVENT_TO_SEARCHABLE = Histogram(
    "tongkuan_ingest_event_to_searchable_seconds",
    "Event time at the marketplace to the index write returning (searchable).",
    ["op"],
    buckets=FRESHNESS_BUCKETS,
)
BATCH_EVENTS = Histogram("tongkuan_ingest_batch_events", "Events per ingest task.", buckets=BATCH_BUCKETS)
STAGE_SECONDS = Histogram(
    "tongkuan_ingest_stage_seconds", "Time per ingest stage per batch.", ["stage"], buckets=STAGE_BUCKETS
)
ITEMS = Counter("tongkuan_ingest_items", "Items by outcome.", ["outcome"])
DLQ_EVENTS = Counter("tongkuan_dlq_events", "Events dead-lettered, by reason code.", ["reason"])
TASKS = Counter("tongkuan_ingest_tasks", "Ingest task attempts by status.", ["status"])
TASK_SECONDS = Histogram("tongkuan_ingest_task_seconds", "Wall time per ingest task attempt.",
                         buckets=STAGE_BUCKETS)
TARGET_WRITE_FAILURES = Counter("tongkuan_ingest_target_write_failures",
                                "Failed writes to a target generation, by its role.", ["role"])

QUEUE_DEPTH_METRIC = "tongkuan_celery_queue_depth"
BROKER_UP_METRIC = "tongkuan_celery_broker_up"


def observe_stages(stage_seconds: dict[str, float]) -> None:
    for stage, seconds in stage_seconds.items():
        STAGE_SECONDS.labels(stage=stage).observe(seconds)


class QueueDepthCollector(Collector):
    """Celery queue depth from the Redis broker, read on each scrape.

    Kombu's Redis transport keeps a queue as a list named after it, plus one list per priority step
    (``<queue>\\x06\\x16<n>``) when priorities are used; all are summed. Messages a worker has taken
    but not yet acked (acks_late) are not in the list: they are in flight, not queued.
    """

    PRIORITY_SEP = "\x06\x16"
    PRIORITY_STEPS = (0, 3, 6, 9)

    def __init__(self, broker_url: str, queues: Iterable[str], *, timeout_s: float = 0.5):
        import redis

        self.queues = list(queues)
        self._redis = redis.Redis.from_url(broker_url, socket_timeout=timeout_s,
                                           socket_connect_timeout=timeout_s)

    def depth(self, queue: str) -> int:
        names = [queue] + [f"{queue}{self.PRIORITY_SEP}{p}" for p in self.PRIORITY_STEPS if p]
        pipe = self._redis.pipeline(transaction=False)
        for name in names:
            pipe.llen(name)
        return int(sum(pipe.execute()))

    def collect(self):
        depth = GaugeMetricFamily(QUEUE_DEPTH_METRIC, "Messages waiting in the Celery queue.",
                                  labels=["queue"])
        up = GaugeMetricFamily(BROKER_UP_METRIC, "1 if the queue depth could be read from Redis.")
        try:
            for q in self.queues:
                depth.add_metric([q], self.depth(q))
        except Exception as e:  # noqa: BLE001 - a scrape must not fail because Redis is down
            log.debug("queue depth read failed: %s", e)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield depth
        yield up

    def close(self) -> None:
        self._redis.close()


_started_lock = threading.Lock()
_started: dict[str, object] = {}


def start_worker_metrics(ws: WorkerSettings, celery: CelerySettings, *, child: bool) -> int | None:
    """Serve ``/metrics`` for this worker process (idempotent per process); returns the port.

    A prefork child serves ``metrics_port + index`` so that several children on one host do not
    collide; solo/threads serve ``metrics_port``.
    """
    if ws.metrics_port == 0:
        return None
    with _started_lock:
        if "port" in _started:
            return _started["port"]  # type: ignore[return-value]
        port = ws.metrics_port
        if child:
            try:
                from billiard.process import current_process

                port += int(getattr(current_process(), "index", 0) or 0)
            except ImportError:  # pragma: no cover - billiard ships with celery
                pass
        collector = QueueDepthCollector(celery.broker_url, [celery.queue])
        REGISTRY.register(collector)
        try:
            start_http_server(port, addr=ws.metrics_addr)
        except OSError:
            REGISTRY.unregister(collector)
            collector.close()
            log.exception("cannot serve /metrics on %s:%d", ws.metrics_addr, port)
            return None
        _started.update(port=port, collector=collector)
        log.info("worker /metrics on http://%s:%d/metrics", ws.metrics_addr, port)
        return port
