"""Prometheus metrics of the dispatcher (served on its ``/metrics``, ``TONGKUAN_DISPATCHER__METRICS_PORT``).

``tongkuan_dispatcher_lag_records{topic,partition}`` is the fetch-response high watermark minus the
committed offset (right on Kafka and on Tansu; see ``workers.dispatcher``).
"""

from prometheus_client import Counter, Gauge, Histogram

_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
BATCH_RECORDS = Histogram("tongkuan_dispatcher_batch_records", "records per batch", buckets=_BATCH_BUCKETS)
BATCH_EVENTS = Histogram(
    "tongkuan_dispatcher_batch_events", "events per batch after coalescing", buckets=_BATCH_BUCKETS
)
EVENTS = Counter("tongkuan_dispatcher_events_total", "records consumed by event type", ["type"])
ISOLATED = Counter("tongkuan_dispatcher_isolated_batches_total",
                   "batches that failed max_batch_attempts times and were sent one task per event")
BATCH_FAILED_ATTEMPTS = Histogram(
    "tongkuan_dispatcher_batch_failed_attempts",
    "failed attempts of each committed batch before it committed (at most max_batch_attempts)",
    buckets=(0, 1, 2, 3, 4, 5, 6, 8, 10, 20, 50, 100),
)
FORWARDED = Counter("tongkuan_dispatcher_forwarded_total",
                    "feature events found on the state topic and forwarded to the feature topic")
COALESCED = Counter("tongkuan_dispatcher_coalesced_total", "events dropped by per-item coalescing")
DEAD_LETTERS = Counter(
    "tongkuan_dispatcher_dead_letters_total",
    "dead letters by reason; stage=dispatcher (published here) or task (reported by the task)",
    ["reason", "stage"],
)
TASK_FAILURES = Counter("tongkuan_dispatcher_task_failures_total", "failed task attempts", ["kind"])
BATCH_RETRIES = Counter("tongkuan_dispatcher_batch_retries_total", "batches rewound and re-sent")
COMMITS = Counter("tongkuan_dispatcher_commits_total", "offset commits by outcome", ["outcome"])
RECORDS_COMMITTED = Counter(
    "tongkuan_dispatcher_records_committed_total", "records whose offsets were committed"
)
COMMIT_SECONDS = Histogram(
    "tongkuan_dispatcher_commit_seconds",
    "offset commit call latency",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
BATCH_SECONDS = Histogram(
    "tongkuan_dispatcher_batch_seconds",
    "first record fetched → offsets committed",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
LAG = Gauge(
    "tongkuan_dispatcher_lag_records",
    "fetch-response high watermark − committed offset (correct on Kafka and Tansu; see module doc)",
    ["topic", "partition"],
)
