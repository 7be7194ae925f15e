"""Dispatcher: ``catalog.items`` (Kafka) → batched Celery tasks, committing only what is done.

A pipeline of up to ``max_in_flight`` batches, in a single thread:

1. **Gather**: poll up to ``max_batch`` records, waiting at most ``max_wait_ms`` after the first.
2. **Parse**: a record that is not JSON, has an unknown ``schema_version`` or is not a valid event is
   dead-lettered to ``catalog.items.dlq`` at once (original bytes + reason headers).
3. **Coalesce** per item: of the upserts/deletes for one item the highest ``version`` wins (a delete
   with a higher version beats an upsert; equal versions: the later record in the log wins); of the
   feature updates for one item the latest ``event_time`` wins (counters are snapshots).
4. **Send** the events as ``tongkuan.apply_catalog_events`` tasks (one list of event dicts each,
   at most ``task_chunk`` events per task, the tasks of a batch of near-equal size so that they
   finish together). After coalescing an item appears once per batch, so the chunks
   of one batch may run in parallel without reordering an item's events. A batch is sent while
   older ones are still in flight only if it shares no item with them (otherwise it waits), so an
   item has one writer at a time and per-item order across batches holds.
5. **Complete** batches oldest first (consumer paused but polled while the pipeline is full, to
   stay in the group): when every task of the oldest batch succeeded (a task's own dead letters
   count as done) its offsets are committed. A failed or timed-out task fails the pipeline: the
   consumer seeks back to the oldest uncommitted batch's first offsets, younger in-flight batches
   are dropped, and the same records are re-fetched and re-sent after a backoff — a batch is never
   skipped. Tasks are idempotent (point ids from item ids, version-guarded writes), so re-sending
   (also of a dropped batch whose tasks ran anyway) is harmless.
6. **Commit** the next offset per partition, after the DLQ publishes are flushed; batches complete
   in log order, so a commit never passes an unfinished batch.

Delivery is at least once: a crash between 4 and 6 re-sends the batch after restart.

Consumer lag: ``tongkuan_dispatcher_lag_records{partition}`` = the high watermark carried by the last
fetch response − this dispatcher's committed offset. On Apache Kafka this equals what
``kafka-consumer-groups --describe`` shows as LAG (log end − committed, for a non-transactional
topic). On Tansu it is right too, whereas ListOffsets-based tools (``kafka-consumer-groups``,
kafka-exporter, ``KafkaConsumer.end_offsets``) show a wrong value after batched produces (Tansu
answers ListOffsets with the last batch's base offset + 1). The gauge is refreshed on every poll, so
while a batch is in flight it may trail by one batch. ``tongkuan_dispatcher_records_committed_total``
against the hook's ``tongkuan_hook_events_total{outcome="accepted"}`` gives an end-to-end count.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

from prometheus_client import Counter, Gauge, Histogram
from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from events.bus import EventConsumer, EventProducer, PublishError, Record, TopicPartition, dead_letter
from events.models import SCHEMA_VERSION, ItemDeleted, ItemFeaturesUpdated, ItemUpserted, parse_event
from events.topics import CATALOG_ITEMS, CATALOG_ITEMS_DLQ

log = logging.getLogger(__name__)

TASK_NAME = "tongkuan.apply_catalog_events"
CatalogEvent = ItemUpserted | ItemDeleted | ItemFeaturesUpdated


class DispatcherSettings(BaseSettings):
    """Env: ``TONGKUAN_DISPATCHER_*``. Kafka connection: ``events.kafka.KafkaSettings``."""

    model_config = SettingsConfigDict(env_prefix="TONGKUAN_DISPATCHER_", extra="forbid")

    group_id: str = "tongkuan-dispatcher"
    topic: str = CATALOG_ITEMS
    dlq_topic: str = CATALOG_ITEMS_DLQ
    # A batch closes at max_batch records or max_wait_ms after its first record.
    max_batch: int = Field(default=64, ge=1, le=10_000)
    max_wait_ms: int = Field(default=200, ge=0)
    # Events per Celery task at most; a batch becomes ceil(events / task_chunk) tasks of near-equal
    # size, run in parallel.
    task_chunk: int = Field(default=64, ge=1)
    # Batches whose tasks may be queued or running at once. 2 keeps the worker busy while the
    # dispatcher commits one batch and gathers the next (make bench-ingest); an item is never in
    # two in-flight batches (a batch touching an in-flight item waits), so one writer per item.
    max_in_flight: int = Field(default=2, ge=1, le=16)
    # A task not done by then fails its batch (re-sent). Must exceed a worker's longest batch,
    # including its own retries, or work is duplicated (harmless but wasted).
    task_timeout_s: float = Field(default=300.0, gt=0)
    # While every in-flight slot is taken: check the oldest batch's tasks every tick_s, and poll the
    # (paused) consumer only every keepalive_poll_s (see ``Dispatcher._tick``).
    tick_s: float = Field(default=0.05, gt=0, le=1.0)
    keepalive_poll_s: float = Field(default=1.0, gt=0, le=60.0)
    retry_backoff_s: float = Field(default=0.5, gt=0)
    retry_backoff_max_s: float = Field(default=30.0, gt=0)
    # On SIGTERM: how long the in-flight batch may still finish (and be committed) before it is
    # abandoned uncommitted (redelivered to the next dispatcher).
    shutdown_grace_s: float = Field(default=5.0, ge=0)
    dlq_flush_timeout_s: float = Field(default=10.0, gt=0)
    # /metrics via prometheus_client.start_http_server; 0 = off. (Workers use 9102.)
    metrics_port: int = Field(default=9103, ge=0, le=65535)
    metrics_addr: str = "127.0.0.1"


# --------------------------------------------------------------------------------------------------
# Task sending: a protocol (fakes in tests) and the Celery implementation


class TaskHandle(Protocol):
    def ready(self) -> bool: ...

    def get(self, timeout: float) -> dict[str, Any]:
        """The task's result; raises if the task failed or is not done within ``timeout``."""
        ...


class TaskSender(Protocol):
    def send(self, events: list[dict[str, Any]]) -> TaskHandle: ...


class _CeleryHandle:
    def __init__(self, result: Any) -> None:
        self._result = result

    def ready(self) -> bool:
        return bool(self._result.ready())

    def get(self, timeout: float) -> dict[str, Any]:
        try:
            return self._result.get(timeout=timeout, propagate=True, disable_sync_subtasks=False)
        finally:
            if self._result.ready():
                self._result.forget()  # the dispatcher was its only reader; free the backend key


class CelerySender:
    """Sends ``tongkuan.apply_catalog_events`` by name on the given Celery app (routing and queue
    come from the app's ``task_routes``). The app needs a result backend: the dispatcher waits."""

    def __init__(self, celery_app: Any, task_name: str = TASK_NAME, queue: str | None = None) -> None:
        self.app = celery_app
        self.task_name = task_name
        self.queue = queue

    def send(self, events: list[dict[str, Any]]) -> TaskHandle:
        options = {"queue": self.queue} if self.queue else {}
        # argsrepr: the message header's printable args (for monitoring); Celery's default is a
        # safe repr of all the events, a third of send_task's CPU for a task of 64 events.
        return _CeleryHandle(self.app.send_task(self.task_name, args=[events], argsrepr=f"[<{len(events)} events>]",
                                                kwargsrepr="{}", **options))


# --------------------------------------------------------------------------------------------------
# Metrics (registered once per process)

_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
BATCH_RECORDS = Histogram("tongkuan_dispatcher_batch_records", "records per batch", buckets=_BATCH_BUCKETS)
BATCH_EVENTS = Histogram(
    "tongkuan_dispatcher_batch_events", "events per batch after coalescing", buckets=_BATCH_BUCKETS
)
EVENTS = Counter("tongkuan_dispatcher_events_total", "records consumed by event type", ["type"])
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


# --------------------------------------------------------------------------------------------------
# Parsing and coalescing (pure functions)


@dataclass(frozen=True)
class Rejected:
    reason: str  # malformed_json | unknown_schema_version | invalid_event | empty_record
    detail: str


def split_evenly(events: list, most: int) -> list[list]:
    """``events`` in ceil(len / most) consecutive chunks whose sizes differ by at most one: 80
    events at 64 a task are two tasks of 40, not 64 and 16, so that the batch's tasks finish
    together instead of leaving a worker thread idle behind the longer one."""
    k = -(-len(events) // most)
    return [events[i * len(events) // k : (i + 1) * len(events) // k] for i in range(k)]


def parse_record(value: bytes | None) -> CatalogEvent | Rejected:
    if not value:
        return Rejected("empty_record", "record has no value")
    try:
        raw = json.loads(value)
    except (ValueError, UnicodeDecodeError) as e:
        return Rejected("malformed_json", str(e)[:200])
    if not isinstance(raw, dict):
        return Rejected("invalid_event", f"expected a JSON object, got {type(raw).__name__}")
    sv = raw.get("schema_version", SCHEMA_VERSION)
    if sv != SCHEMA_VERSION:
        return Rejected(
            "unknown_schema_version", f"schema_version {sv!r} (this dispatcher reads {SCHEMA_VERSION})"
        )
    try:
        return parse_event(raw)
    except ValidationError as e:
        errs = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors()[:3])
        return Rejected("invalid_event", errs[:500])


def coalesce(events: Sequence[CatalogEvent]) -> list[CatalogEvent]:
    """One state event (upsert/delete) and one features event per item, in first-seen order.

    ``events`` are in log order; an equal version/time keeps the later one.
    """
    state: dict[str, ItemUpserted | ItemDeleted] = {}
    features: dict[str, ItemFeaturesUpdated] = {}
    order: list[tuple[str, str]] = []
    for ev in events:
        if isinstance(ev, ItemFeaturesUpdated):
            cur_f = features.get(ev.item_id)
            if cur_f is None:
                order.append(("f", ev.item_id))
            if cur_f is None or ev.event_time >= cur_f.event_time:
                features[ev.item_id] = ev
        else:
            cur = state.get(ev.item_id)
            if cur is None:
                order.append(("s", ev.item_id))
            if cur is None or ev.version >= cur.version:
                state[ev.item_id] = ev
    return [state[i] if kind == "s" else features[i] for kind, i in order]


# --------------------------------------------------------------------------------------------------
# The dispatcher


@dataclass
class BatchResult:
    records: int
    events: int
    dead_lettered: dict[str, int] = field(default_factory=dict)
    committed: dict[TopicPartition, int] = field(default_factory=dict)
    ok: bool = True
    error: str | None = None


@dataclass
class _Batch:
    records: list[Record]
    events: list[dict[str, Any]]
    dead: dict[str, int]
    items: frozenset[str]
    handles: list[Any] = field(default_factory=list)
    gathered_at: float = field(default_factory=time.monotonic)
    sent_at: float = 0.0


class Dispatcher:
    def __init__(
        self,
        consumer: EventConsumer,
        sender: TaskSender,
        dlq: EventProducer,
        settings: DispatcherSettings | None = None,
        sleep: Callable[[float], None] | None = None,
    ) -> None:
        self.consumer = consumer
        self.sender = sender
        self.dlq = dlq
        self.settings = settings or DispatcherSettings()
        self.stop_event = threading.Event()
        self._backoff = self.settings.retry_backoff_s
        # (tp, offset) already dead-lettered and flushed but not yet committed: a rewound batch
        # does not dead-letter them twice.
        self._dead_lettered: set[tuple[TopicPartition, int]] = set()
        self._committed: dict[TopicPartition, int] = {}
        self._sleep = sleep
        self._inflight: list[_Batch] = []  # sent, oldest first
        self._pending: _Batch | None = None  # gathered, waiting for an in-flight item to finish
        self._polled_at = time.monotonic()  # the consumer's last poll

    # -- public -----------------------------------------------------------------------------------

    def run(self, max_batches: int | None = None, idle_timeout: float | None = None) -> None:
        """Loop until ``stop()`` (or SIGTERM via ``install_signal_handlers``); for tests, also until
        ``max_batches`` batches were committed or nothing arrived for ``idle_timeout`` seconds."""
        done = 0
        idle_since = time.monotonic()
        while not self.stop_event.is_set():
            result = self.step()
            if result is None:
                if self._inflight or self._pending is not None:
                    idle_since = time.monotonic()
                elif idle_timeout is not None and time.monotonic() - idle_since > idle_timeout:
                    return
                continue
            idle_since = time.monotonic()
            if result.ok:
                done += 1
                if max_batches is not None and done >= max_batches:
                    return
        self._drain()

    def stop(self) -> None:
        self.stop_event.set()

    def install_signal_handlers(self) -> None:
        def handler(signum: int, _frame: object) -> None:
            log.info(
                "signal %d: stopping after the in-flight batches (grace %.1fs)",
                signum,
                self.settings.shutdown_grace_s,
            )
            self.stop()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def step(self) -> BatchResult | None:
        """Advance the pipeline by one move: complete the oldest in-flight batch if its tasks are
        done, else start (gather and send) a batch if there is room, else wait a tick. Returns the
        result of a batch that completed or failed, None otherwise."""
        if self._inflight:
            result = self._try_complete()
            if result is not None:
                return result
        if len(self._inflight) < self.settings.max_in_flight and not self.stop_event.is_set():
            started = self._start()
            if started is not None:
                return started
            if self._inflight and self._pending is None:
                return None  # a batch went out; check the older ones next
        if self._inflight:
            self._tick()
        return None

    # -- steps ------------------------------------------------------------------------------------

    def _gather(self) -> list[Record]:
        s = self.settings
        records = self.consumer.poll(s.max_batch, timeout=max(s.max_wait_ms / 1000, 0.1))
        self._polled_at = time.monotonic()
        if records:
            deadline = time.monotonic() + s.max_wait_ms / 1000
            while len(records) < s.max_batch and not self.stop_event.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                records += self.consumer.poll(s.max_batch - len(records), timeout=left)
        self._update_lag(records)
        return records

    def _prepare(self, records: list[Record]) -> _Batch | BatchResult:
        """Parse, dead-letter the invalid records (flushed), coalesce."""
        s = self.settings
        events: list[CatalogEvent] = []
        dead: dict[str, int] = {}
        for rec in records:
            parsed = parse_record(rec.value)
            if isinstance(parsed, Rejected):
                EVENTS.labels("invalid").inc()
                if (rec.tp, rec.offset) not in self._dead_lettered:
                    dead_letter(self.dlq, s.dlq_topic, rec, parsed.reason, parsed.detail, stage="dispatcher")
                    self._dead_lettered.add((rec.tp, rec.offset))
                    DEAD_LETTERS.labels(parsed.reason, "dispatcher").inc()
                dead[parsed.reason] = dead.get(parsed.reason, 0) + 1
                continue
            EVENTS.labels(parsed.type).inc()
            events.append(parsed)
        # Dead letters first: if the DLQ is down, nothing is committed and the batch is retried.
        try:
            self.dlq.flush(s.dlq_flush_timeout_s)
        except PublishError as e:
            log.warning("DLQ publish failed, batch will be retried: %s", e)
            self._dead_lettered.difference_update((r.tp, r.offset) for r in records)
            return BatchResult(len(records), 0, dead, ok=False, error=f"dlq: {e}")
        batch = coalesce(events)
        COALESCED.inc(len(events) - len(batch))
        BATCH_RECORDS.observe(len(records))
        BATCH_EVENTS.observe(len(batch))
        return _Batch(records, [ev.model_dump(mode="json") for ev in batch], dead,
                      frozenset(ev.item_id for ev in batch))

    def _start(self) -> BatchResult | None:
        """Gather a batch (unless one waits already) and send it when no in-flight batch shares an
        item with it. A failure here fails the pipeline (see ``_fail``)."""
        if self._pending is None:
            records = self._gather()
            if not records:
                return None
            prepared = self._prepare(records)
            if isinstance(prepared, BatchResult):
                return self._fail(prepared, extra=records)
            self._pending = prepared
        batch = self._pending
        if any(batch.items & b.items for b in self._inflight):
            return None  # one writer per item: wait until the older batch is done
        s = self.settings
        chunks = split_evenly(batch.events, s.task_chunk)
        try:
            batch.handles = [self.sender.send(chunk) for chunk in chunks]
        except Exception as e:  # noqa: BLE001 - the task broker is down: retry the batch
            TASK_FAILURES.labels("send").inc()
            return self._fail(BatchResult(len(batch.records), len(batch.events), batch.dead, ok=False,
                                          error=f"send: {e!r}"))
        batch.sent_at = time.monotonic()
        self._pending = None
        self._inflight.append(batch)
        return None

    def _try_complete(self) -> BatchResult | None:
        """Commit the oldest in-flight batch if all its tasks succeeded; fail on error/timeout."""
        s = self.settings
        batch = self._inflight[0]
        fail = partial(BatchResult, len(batch.records), len(batch.events), batch.dead, ok=False)
        if not all(h.ready() for h in batch.handles):
            if time.monotonic() - batch.sent_at > s.task_timeout_s:
                pending = sum(1 for h in batch.handles if not h.ready())
                TASK_FAILURES.labels("timeout").inc(pending)
                return self._fail(fail(error=f"{pending} task(s) not done after {s.task_timeout_s}s"))
            return None
        for h in batch.handles:
            try:
                result = h.get(timeout=1.0)
            except Exception as e:  # noqa: BLE001 - the task raised: the batch is retried
                TASK_FAILURES.labels("error").inc()
                return self._fail(fail(error=f"task failed: {e!r}"))
            for dl in (result or {}).get("dead_lettered", []) if isinstance(result, dict) else []:
                DEAD_LETTERS.labels(str(dl.get("reason", "unknown")), "task").inc()
        offsets: dict[TopicPartition, int] = {}
        for rec in batch.records:
            offsets[rec.tp] = max(offsets.get(rec.tp, 0), rec.offset + 1)
        t0 = time.perf_counter()
        try:
            self.consumer.commit(offsets)
        except Exception as e:  # noqa: BLE001 - e.g. CommitFailedError after a rebalance
            COMMITS.labels("failed").inc()
            log.warning("commit failed (partitions revoked?); records will be redelivered: %r", e)
            return self._fail(fail(error=f"commit: {e!r}"))
        COMMIT_SECONDS.observe(time.perf_counter() - t0)
        COMMITS.labels("ok").inc()
        RECORDS_COMMITTED.inc(len(batch.records))
        BATCH_SECONDS.observe(time.monotonic() - batch.gathered_at)
        self._inflight.pop(0)
        self._committed.update(offsets)
        self._dead_lettered = {(tp, o) for tp, o in self._dead_lettered if o >= self._committed.get(tp, 0)}
        self._update_lag([])
        self._backoff = s.retry_backoff_s
        return BatchResult(len(batch.records), len(batch.events), batch.dead, offsets)

    def _fail(self, result: BatchResult, extra: list[Record] | None = None) -> BatchResult:
        """Rewind to the oldest uncommitted record, drop every in-flight and waiting batch (their
        records come again; tasks already sent may still run, harmlessly), back off."""
        records = [r for b in self._inflight for r in b.records] + (extra or [])
        if self._pending is not None:
            records += self._pending.records
        self._inflight.clear()
        self._pending = None
        self._rewind(records)
        BATCH_RETRIES.inc()
        if not self.stop_event.is_set():
            self._keepalive(self._backoff)
            self._backoff = min(self._backoff * 2, self.settings.retry_backoff_max_s)
        return result

    def _tick(self) -> None:
        """Wait a little (``tick_s``) for tasks while staying in the consumer group.

        The consumer is polled (paused) only every ``keepalive_poll_s``: kafka-python sends the
        heartbeats from its own thread, and a poll is needed only to run a rebalance and within
        ``max.poll.interval``. A paused poll on every 50 ms tick cost 1.6 ms of CPU each, over half
        of the dispatcher's CPU during sustained ingest, on the cores the embedding needs."""
        if time.monotonic() - self._polled_at >= self.settings.keepalive_poll_s:
            with self._paused():
                self.consumer.poll(1, timeout=0)
            self._polled_at = time.monotonic()
        time.sleep(self.settings.tick_s)  # not stop_event.wait: _drain ticks after the stop

    def _drain(self) -> None:
        """On stop: let in-flight batches finish (and commit) within the grace period, then abandon
        the rest uncommitted: the next dispatcher gets those records again."""
        self._pending = None
        deadline = time.monotonic() + self.settings.shutdown_grace_s
        while self._inflight and time.monotonic() < deadline:
            if self._try_complete() is None and self._inflight:
                self._tick()
        if self._inflight:
            log.info("shutdown: %d in-flight batch(es) abandoned, not committed", len(self._inflight))
            self._inflight.clear()

    def _rewind(self, records: list[Record]) -> None:
        first: dict[TopicPartition, int] = {}
        for rec in records:
            first[rec.tp] = min(first.get(rec.tp, rec.offset), rec.offset)
        for tp, off in first.items():
            try:
                self.consumer.seek(tp, off)
            except Exception as e:  # noqa: BLE001 - partition no longer ours: its new owner resumes
                log.info("seek %s failed (%r); its new owner redelivers", tp, e)

    def _keepalive(self, seconds: float) -> None:
        if self._sleep is not None:
            self._sleep(seconds)
            return
        end = time.monotonic() + seconds
        with self._paused():
            while time.monotonic() < end and not self.stop_event.is_set():
                self.consumer.poll(1, timeout=min(0.1, max(end - time.monotonic(), 0)))

    @contextmanager
    def _paused(self) -> Iterator[None]:
        """Polls inside return no records (they keep the group membership and run rebalances)."""
        self.consumer.pause()
        try:
            yield
        finally:
            self.consumer.resume()

    def _update_lag(self, records: list[Record]) -> None:
        for rec in records:
            # Before the first commit, the first fetched offset is where this group stands.
            self._committed.setdefault(rec.tp, rec.offset)
        for tp, committed in self._committed.items():
            try:
                hw = self.consumer.highwater(tp)
            except Exception:  # noqa: BLE001 - kafka-python raises for a partition no longer assigned
                continue  # (a rebalance, e.g. after a broker restart): the gauge is not worth a crash
            if hw is not None:
                LAG.labels(tp.topic, str(tp.partition)).set(max(hw - committed, 0))


# --------------------------------------------------------------------------------------------------
# Process entry point: python -m workers.dispatcher


def build_dispatcher(
    celery_app: Any, settings: DispatcherSettings | None = None, kafka_settings: Any = None
) -> Dispatcher:
    """The production wiring: Kafka consumer (group ``settings.group_id``), Kafka DLQ producer,
    Celery sender on ``celery_app``."""
    from events.kafka import KafkaSettings, make_consumer, make_producer

    s = settings or DispatcherSettings()
    ks = kafka_settings or KafkaSettings()
    consumer = make_consumer([s.topic], s.group_id, ks)
    return Dispatcher(consumer, CelerySender(celery_app), make_producer(ks), s)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = DispatcherSettings()
    if settings.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(settings.metrics_port, addr=settings.metrics_addr)
        log.info("metrics on http://%s:%d/metrics", settings.metrics_addr, settings.metrics_port)
    from workers.celery_app import app as celery_app

    dispatcher = build_dispatcher(celery_app, settings)
    dispatcher.install_signal_handlers()
    log.info("dispatcher consuming %s as group %s", settings.topic, settings.group_id)
    try:
        dispatcher.run()
    finally:
        dispatcher.consumer.close()
        dispatcher.dlq.close()
        log.info("dispatcher stopped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = [
    "TASK_NAME",
    "BatchResult",
    "CelerySender",
    "Dispatcher",
    "DispatcherSettings",
    "Rejected",
    "TaskHandle",
    "TaskSender",
    "build_dispatcher",
    "coalesce",
    "main",
    "parse_record",
]
