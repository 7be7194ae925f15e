"""Batches of the dispatcher: what a batch holds, how records become one (``BatchMaker``), and how
a batch is cut into tasks (``split_evenly``)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from events.bus import EventProducer, PublishError, Record, TopicPartition
from events.contract import PROCESSING_FAILED, Rejected, Source, Sourced, coalesce, encode_task, parse_record
from events.deadletter import DeadLetter, publish
from events.models import ItemFeaturesUpdated
from workers.dispatcher_metrics import (
    BATCH_EVENTS,
    BATCH_RECORDS,
    COALESCED,
    DEAD_LETTERS,
    EVENTS,
    FORWARDED,
    ISOLATED,
)
from workers.settings import DispatcherSettings

log = logging.getLogger(__name__)


def split_evenly(events: list, most: int) -> list[list]:
    """``events`` in ceil(len / most) consecutive chunks whose sizes differ by at most one: 80
    events at 64 a task are two tasks of 40, not 64 and 16, so that the batch's tasks finish
    together instead of leaving a worker thread idle behind the longer one."""
    k = -(-len(events) // most)
    return [events[i * len(events) // k : (i + 1) * len(events) // k] for i in range(k)]


@dataclass
class BatchResult:
    records: int
    events: int
    dead_lettered: dict[str, int] = field(default_factory=dict)
    committed: dict[TopicPartition, int] = field(default_factory=dict)
    ok: bool = True
    error: str | None = None


@dataclass
class Batch:
    records: list[Record]
    events: list[dict[str, Any]]  # the task message (events.contract.encode_task)
    sourced: list[Sourced]  # the same events, for their dead letters
    dead: dict[str, int]
    items: frozenset[str]
    attempts: int = 0  # how often these records failed before, in a batch
    # Sent as one task per event (the records failed max_batch_attempts times): an event that fails
    # alone is dead-lettered and the batch commits.
    isolated: bool = False
    handles: list[Any] = field(default_factory=list)
    gathered_at: float = field(default_factory=time.monotonic)
    sent_at: float = 0.0


class BatchMaker:
    """Records → a batch: parse (``events.contract``), dead-letter what is not an event, forward
    feature events to their own topic (both flushed before anything may be committed), coalesce,
    and decide whether the batch goes out whole or one task per event. It remembers what it
    published (a rewound batch publishes nothing twice) and how often each record's batch failed."""

    def __init__(self, producer: EventProducer, settings: DispatcherSettings) -> None:
        self.producer, self.settings = producer, settings
        # (tp, offset) already dead-lettered or forwarded, flushed but not yet committed.
        self._published: set[tuple[TopicPartition, int]] = set()
        # (tp, offset) -> how often the batch holding that record failed, and its last error.
        self._attempts: dict[tuple[TopicPartition, int], int] = {}
        self._last_error: dict[tuple[TopicPartition, int], str] = {}

    def make(self, records: list[Record]) -> Batch | BatchResult:
        """Parse; dead-letter the invalid records and forward the feature events (flushed); coalesce."""
        s = self.settings
        events: list[Sourced] = []
        dead: dict[str, int] = {}
        for rec in records:
            parsed = parse_record(rec.value)
            first_time = (rec.tp, rec.offset) not in self._published
            if isinstance(parsed, Rejected):
                EVENTS.labels("invalid").inc()
                if first_time:
                    letter = DeadLetter.of_record(rec, reason=parsed.reason, detail=parsed.detail, stage="dispatcher",
                                                  item_id=parsed.item_id)
                    publish(self.producer, s.dlq_topic, [letter])
                    self._published.add((rec.tp, rec.offset))
                    DEAD_LETTERS.labels(parsed.reason, "dispatcher").inc()
                dead[parsed.reason] = dead.get(parsed.reason, 0) + 1
                continue
            EVENTS.labels(parsed.type).inc()
            if isinstance(parsed, ItemFeaturesUpdated):
                if first_time:
                    self.producer.publish(s.features_topic, rec.key, rec.value or b"", rec.headers)
                    self._published.add((rec.tp, rec.offset))
                    FORWARDED.inc()
                continue
            events.append(Sourced(parsed, rec.value or b"", Source(rec.topic, rec.partition, rec.offset)))
        # Published first: if the bus is down, nothing is committed and the batch is retried.
        try:
            self.producer.flush(s.dlq_flush_timeout_s)
        except PublishError as e:
            log.warning("dead letters / forwards not acknowledged, batch will be retried: %s", e)
            self._published.difference_update((r.tp, r.offset) for r in records)
            return BatchResult(len(records), 0, dead, ok=False, error=f"publish: {e}")
        batch = coalesce(events, lambda x: x.event)
        COALESCED.inc(len(events) - len(batch))
        BATCH_RECORDS.observe(len(records))
        BATCH_EVENTS.observe(len(batch))
        attempts = max((self._attempts.get((r.tp, r.offset), 0) for r in records), default=0)
        isolated = attempts >= s.max_batch_attempts and bool(batch)
        if isolated:
            ISOLATED.inc()
            log.warning("a batch of %d events failed %d times (last: %s): one task per event now; an event that "
                        "fails alone is dead-lettered", len(batch), attempts, self._error_of(records))
        return Batch(records, encode_task(batch), batch, dead, frozenset(x.event.item_id for x in batch),
                      attempts, isolated)

    def _error_of(self, records: list[Record]) -> str:
        return next((self._last_error[(r.tp, r.offset)] for r in records if (r.tp, r.offset) in self._last_error),
                    "?")

    def failed(self, records: list[Record], error: str | None) -> None:
        """The batch of ``records`` failed (its tasks, or its dead letters): one attempt more."""
        for r in records:
            key = (r.tp, r.offset)
            self._attempts[key] = self._attempts.get(key, 0) + 1
            self._last_error[key] = error or "?"

    def committed(self, offsets: dict[TopicPartition, int]) -> None:
        """Forget what lies below the committed offsets."""
        self._published = {(tp, o) for tp, o in self._published if o >= offsets.get(tp, 0)}
        for key in [k for k in self._attempts if k[1] < offsets.get(k[0], 0)]:
            del self._attempts[key]
            self._last_error.pop(key, None)

    def dead_letter_alone(self, batch: Batch, failures: list[tuple[int, BaseException]]) -> None:
        """Dead-letter the events of an isolated batch that failed alone (flushed; ``PublishError``
        if the dead-letter topic does not acknowledge)."""
        letters = [DeadLetter.of_event(batch.sourced[n], reason=PROCESSING_FAILED, stage="dispatcher",
                                       attempts=batch.attempts + 1,
                                       detail=f"its batch failed {batch.attempts} times, then it failed alone: {e!r}")
                   for n, e in failures]
        if not letters:
            return
        publish(self.producer, self.settings.dlq_topic, letters)
        self.producer.flush(self.settings.dlq_flush_timeout_s)
        for letter in letters:
            DEAD_LETTERS.labels(PROCESSING_FAILED, "dispatcher").inc()
            log.warning("dead-lettered %s: %s", letter.item_id, letter.detail)


__all__ = ["Batch", "BatchMaker", "BatchResult", "split_evenly"]
