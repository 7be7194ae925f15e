"""The feature-store consumer: the feature topics → ``ItemFeatureAggregator`` → Feast (an
``events.bus`` consumer, a dead-letter producer, a settings model; ``python -m tongkuan.features``
and the embedded event path run it).

One poll is one aggregator batch, committed after it: the batch's pushes run inside the
aggregator's transaction, so a crash anywhere before the commit redelivers the batch, and the event
ids make the redelivery change nothing. Records the aggregator refuses on the topics this consumer
owns (``catalog.features``, ``search.interactions``) are dead-lettered with the refusal's reason
(stage ``features``); on ``catalog.items`` (read for price and category; the dispatcher owns that
topic and its dead letters) whatever is not a feature input is skipped. ``run`` also calls
``refresh`` every ``refresh_every_s``.
"""

from __future__ import annotations

import logging
import threading
import time

from prometheus_client import Counter
from pydantic import BaseModel, ConfigDict, Field

from events.bus import EventConsumer, EventProducer, Record, TopicPartition
from events.deadletter import DeadLetter, publish
from events.topics import CATALOG_FEATURES, CATALOG_ITEMS, CATALOG_ITEMS_DLQ
from feature_store.aggregator import IngestReport, ItemFeatureAggregator
from feature_store.inputs import INTERACTIONS_TOPIC, Rejection

log = logging.getLogger(__name__)

RECORDS = Counter("tongkuan_feature_store_records", "Records of the feature topics, by outcome: accepted, "
                  "duplicate (a redelivery), rejected (dead-lettered), skipped (not a feature input, on "
                  "catalog.items).", ["outcome"])


class FeatureConsumerSettings(BaseModel):
    """The feature-store consumer (env ``TONGKUAN_FEATURES__*``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    topics: tuple[str, ...] = Field(default=(CATALOG_FEATURES, INTERACTIONS_TOPIC, CATALOG_ITEMS), min_length=1,
                                    description="what the consumer reads (catalog.items for prices and categories)")
    owned_topics: tuple[str, ...] = Field(default=(CATALOG_FEATURES, INTERACTIONS_TOPIC),
                                          description="topics whose refused records are dead-lettered")
    group_id: str = Field(default="tongkuan-feature-store", description="Kafka consumer group")
    dlq_topic: str = Field(default=CATALOG_ITEMS_DLQ, description="where refused records go")
    max_batch: int = Field(default=1000, ge=1, description="records per poll = per aggregator batch")
    refresh_every_s: float = Field(default=3600.0, gt=0, description="how often run() calls refresh()")
    metrics_port: int = Field(default=9104, ge=0, le=65535, description="/metrics port (0: off)")
    metrics_addr: str = Field(default="127.0.0.1", description="/metrics address")


class FeatureStoreConsumer:
    def __init__(self, consumer: EventConsumer, aggregator: ItemFeatureAggregator, dlq: EventProducer,
                 settings: FeatureConsumerSettings | None = None) -> None:
        self.consumer, self.aggregator, self.dlq = consumer, aggregator, dlq
        self.settings = settings or FeatureConsumerSettings()
        self.stop_event = threading.Event()
        self.last_report = IngestReport()

    def step(self, timeout: float = 0.5) -> int:
        """One poll → one batch → dead letters flushed → offsets committed. Returns the records."""
        records = self.consumer.poll(self.settings.max_batch, timeout=timeout)
        if not records:
            return 0
        report = self.aggregator.ingest([r.value or b"" for r in records])
        self.last_report = report
        letters, skipped = self._letters(records, report.rejections)
        RECORDS.labels(outcome="accepted").inc(report.accepted)
        RECORDS.labels(outcome="duplicate").inc(report.duplicates)
        RECORDS.labels(outcome="rejected").inc(len(letters))
        RECORDS.labels(outcome="skipped").inc(skipped)
        if letters:
            publish(self.dlq, self.settings.dlq_topic, letters)
            self.dlq.flush(10.0)
        offsets: dict[TopicPartition, int] = {}
        for rec in records:
            offsets[rec.tp] = max(offsets.get(rec.tp, 0), rec.offset + 1)
        self.consumer.commit(offsets)
        return len(records)

    def _letters(self, records: list[Record], rejections: list[Rejection]) -> tuple[list[DeadLetter], int]:
        letters, skipped = [], 0
        for r in rejections:
            rec = records[r.index] if r.index is not None else None
            if rec is None or rec.topic not in self.settings.owned_topics:
                skipped += 1
                continue
            letters.append(DeadLetter.of_record(rec, reason=r.reason, detail=r.detail, stage="features",
                                                item_id=r.item_id))
        return letters, skipped

    def run(self, idle_timeout: float | None = None) -> None:
        idle_since = last_refresh = time.monotonic()
        while not self.stop_event.is_set():
            if self.step():
                idle_since = time.monotonic()
            elif idle_timeout is not None and time.monotonic() - idle_since > idle_timeout:
                return
            if time.monotonic() - last_refresh >= self.settings.refresh_every_s:
                pushed = self.aggregator.refresh()
                last_refresh = time.monotonic()
                log.info("refresh: %d rows", pushed)

    def stop(self) -> None:
        self.stop_event.set()


__all__ = ["FeatureConsumerSettings", "FeatureStoreConsumer"]
