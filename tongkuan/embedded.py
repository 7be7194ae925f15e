"""The event path in one process, on the in-memory bus: hook validation → ``catalog.items`` →
the dispatcher → the ingest task's batch logic (run inline) → the index, and ``catalog.features`` /
``search.interactions`` (and prices from ``catalog.items``) → the feature-store consumer → Feast
(SQLite online). The same code as the stack, without Kafka, Redis or Celery: the demo runs on it,
and so do the property tests of the event contract.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from events.bus import InMemoryBus
from events.contract import decode_task
from events.deadletter import DeadLetter, read
from events.hook import publish_events
from events.models import CatalogEvent
from events.topics import ALL_TOPICS, CATALOG_ITEMS, CATALOG_ITEMS_DLQ
from feature_store.aggregator import ItemFeatureAggregator
from feature_store.consumer import FeatureConsumerSettings, FeatureStoreConsumer
from feature_store.store import ItemFeatureStore
from workers.batch import apply_batch
from workers.dispatcher import Dispatcher
from workers.runtime import WorkerRuntime
from workers.settings import DispatcherSettings
from workers.task_queue import InlineSender


class EmbeddedEvents:
    def __init__(self, runtime: WorkerRuntime, feature_store: ItemFeatureStore,
                 dispatcher: DispatcherSettings | None = None) -> None:
        """``feature_store``: applied here; closed by the caller (``close`` closes the aggregator)."""
        self.runtime = runtime
        self.bus = InMemoryBus(partitions=3)
        for topic in ALL_TOPICS:
            self.bus.create_topic(topic, 1 if topic == CATALOG_ITEMS_DLQ else None)
        # The task's dead letters go to this bus's dead-letter topic, beside the dispatcher's.
        runtime.dead_letters = self.bus.producer()
        settings = dispatcher or DispatcherSettings(max_wait_ms=0, metrics_port=0, retry_backoff_s=0.01)
        self.dispatcher = Dispatcher(self.bus.consumer([settings.topic], settings.group_id), InlineSender(self._apply),
                                     self.bus.producer(), settings)
        fs = FeatureConsumerSettings(metrics_port=0)
        feature_store.apply()
        self.feature_store = feature_store
        self.features = FeatureStoreConsumer(self.bus.consumer(fs.topics, fs.group_id),
                                             ItemFeatureAggregator(feature_store), self.bus.producer(), fs)

    def _apply(self, payload: list[dict[str, Any]]) -> dict[str, Any]:
        sourced, rejected = decode_task(payload)
        return apply_batch(sourced, self.runtime, rejected=rejected).result()

    def publish(self, events: Sequence[CatalogEvent]) -> None:
        """What the hook does with valid events: each to its topic, keyed by item id, flushed."""
        publish_events(self.bus.producer(), events, timeout=5.0)

    def publish_raw(self, records: Sequence[tuple[str, bytes]]) -> None:
        """Records as another producer might write them to ``catalog.items`` (poison included)."""
        with self.bus.producer() as p:
            for key, value in records:
                p.publish(CATALOG_ITEMS, key, value)

    def run_until_idle(self, idle_s: float = 0.2) -> None:
        """Dispatch and apply everything published so far; feed the feature store."""
        self.dispatcher.run(idle_timeout=idle_s)
        self.features.run(idle_timeout=idle_s)

    def close(self) -> None:
        self.features.aggregator.close()

    def dead_letters(self) -> list[DeadLetter]:
        return [read(r) for r in self.bus.records(CATALOG_ITEMS_DLQ)]
