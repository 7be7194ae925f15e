"""Dispatcher: ``catalog.items`` (Kafka) → batched Celery tasks, committing only what is done.

A pipeline of up to ``max_in_flight`` batches, in a single thread:

1. **Gather**: poll up to ``max_batch`` records, waiting at most ``max_wait_ms`` after the first.
2. **Parse** (``events.contract.parse_record``): a record that is not JSON, has an unknown
   ``schema_version`` or is not a valid event is dead-lettered to ``catalog.items.dlq`` at once
   (an ``events.deadletter`` envelope: original bytes, reason, source offset). A feature event
   found here (an older producer) is forwarded to ``catalog.features``: the embedding workers never
   see feature events.
3. **Coalesce** per item (``events.contract.coalesce``, the contract's one tie rule: the higher
   version wins, at an equal version a delete wins).
4. **Send** the events as ``tongkuan.apply_catalog_events`` tasks (``events.contract.encode_task``,
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
6. **Commit** the next offset per partition, after dead letters and forwards are flushed; batches complete
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

import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial

from events.bus import EventConsumer, EventProducer, PublishError, Record, TopicPartition
from workers.batches import Batch, BatchMaker, BatchResult, split_evenly
from workers.dispatcher_metrics import (
    BATCH_FAILED_ATTEMPTS,
    BATCH_RETRIES,
    BATCH_SECONDS,
    COMMIT_SECONDS,
    COMMITS,
    DEAD_LETTERS,
    LAG,
    RECORDS_COMMITTED,
    TASK_FAILURES,
)
from workers.settings import DispatcherSettings
from workers.task_queue import TaskSender

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# Batches


class Dispatcher:
    def __init__(
        self,
        consumer: EventConsumer,
        sender: TaskSender,
        producer: EventProducer,
        settings: DispatcherSettings | None = None,
        sleep: Callable[[float], None] | None = None,
    ) -> None:
        """``producer`` publishes dead letters and forwarded feature events."""
        self.consumer = consumer
        self.sender = sender
        self.producer = producer
        self.settings = settings or DispatcherSettings()
        self.stop_event = threading.Event()
        self._backoff = self.settings.retry_backoff_s
        self.batches = BatchMaker(producer, self.settings)
        self._committed: dict[TopicPartition, int] = {}
        self._sleep = sleep
        self._inflight: list[Batch] = []  # sent, oldest first
        self._pending: Batch | None = None  # gathered, waiting for an in-flight item to finish
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

    def _start(self) -> BatchResult | None:
        """Gather a batch (unless one waits already) and send it when no in-flight batch shares an
        item with it. A failure here fails the pipeline (see ``_fail``)."""
        if self._pending is None:
            records = self._gather()
            if not records:
                return None
            prepared = self.batches.make(records)
            if isinstance(prepared, BatchResult):
                return self._fail(prepared, extra=records, failed=records)
            self._pending = prepared
        batch = self._pending
        if any(batch.items & b.items for b in self._inflight):
            return None  # one writer per item: wait until the older batch is done
        s = self.settings
        chunks = [[e] for e in batch.events] if batch.isolated else split_evenly(batch.events, s.task_chunk)
        try:
            batch.handles = [self.sender.send(chunk) for chunk in chunks]
        except Exception as e:  # noqa: BLE001 - the task broker is down: retry the batch
            TASK_FAILURES.labels("send").inc()
            return self._fail(BatchResult(len(batch.records), len(batch.events), batch.dead, ok=False,
                                          error=f"send: {e!r}"), failed=batch.records)
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
            if time.monotonic() - batch.sent_at <= s.task_timeout_s:
                return None
            # No answer is not a verdict on the events (no worker took them, or one died without
            # a result): retried, never dead-lettered. A task that hangs a worker ends by the
            # worker's time limit, which is an answer (an error).
            pending = sum(1 for h in batch.handles if not h.ready())
            TASK_FAILURES.labels("timeout").inc(pending)
            return self._fail(fail(error=f"{pending} task(s) not done after {s.task_timeout_s}s"),
                              failed=batch.records)
        alone: list[tuple[int, BaseException]] = []  # isolated events that failed on their own
        for n, h in enumerate(batch.handles):
            try:
                result = h.get(timeout=1.0)
            except Exception as e:  # noqa: BLE001 - the task raised
                TASK_FAILURES.labels("error").inc()
                if not batch.isolated:  # the batch is retried
                    return self._fail(fail(error=f"task failed: {e!r}"), failed=batch.records)
                alone.append((n, e))  # alone, it failed too: it alone goes to the dead-letter topic
                continue
            for dl in (result or {}).get("dead_lettered", []) if isinstance(result, dict) else []:
                DEAD_LETTERS.labels(str(dl.get("reason", "unknown")), "task").inc()
        try:
            self.batches.dead_letter_alone(batch, alone)
        except PublishError as e:
            return self._fail(fail(error=f"dead letters: {e}"), failed=batch.records)
        offsets: dict[TopicPartition, int] = {}
        for rec in batch.records:
            offsets[rec.tp] = max(offsets.get(rec.tp, 0), rec.offset + 1)
        t0 = time.perf_counter()
        try:
            self.consumer.commit(offsets)
        except Exception as e:  # noqa: BLE001 - e.g. CommitFailedError after a rebalance
            COMMITS.labels("failed").inc()
            log.warning("commit failed (partitions revoked?); records will be redelivered: %r", e)
            return self._fail(fail(error=f"commit: {e!r}"))  # not the batch's fault: no attempt counted
        COMMIT_SECONDS.observe(time.perf_counter() - t0)
        COMMITS.labels("ok").inc()
        RECORDS_COMMITTED.inc(len(batch.records))
        BATCH_SECONDS.observe(time.monotonic() - batch.gathered_at)
        BATCH_FAILED_ATTEMPTS.observe(batch.attempts)
        self._inflight.pop(0)
        self._committed.update(offsets)
        self.batches.committed(self._committed)
        self._update_lag([])
        self._backoff = s.retry_backoff_s
        return BatchResult(len(batch.records), len(batch.events), batch.dead, offsets)

    def _fail(self, result: BatchResult, extra: list[Record] | None = None,
              failed: list[Record] | None = None) -> BatchResult:
        """Rewind to the oldest uncommitted record, drop every in-flight and waiting batch (their
        records come again; tasks already sent may still run, harmlessly), back off. ``failed``:
        the records of the batch at fault, whose attempts count towards ``max_batch_attempts``."""
        self.batches.failed(failed or [], result.error)
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


__all__ = ["Dispatcher"]
