"""The feature-store consumer on the in-memory bus: the feature topics into the store, refused
records dead-lettered with their reasons, a batch redelivered after a crash counted once; and the
measured time from an interaction to its online feature (``bench_freshness``), over both stores."""

from __future__ import annotations

import time

import pytest

from events.bus import InMemoryBus
from events.deadletter import read
from events.models import ItemDeleted, ItemFeaturesUpdated, ItemUpserted, event_to_bytes
from events.topics import CATALOG_FEATURES, CATALOG_ITEMS, CATALOG_ITEMS_DLQ
from feature_store.aggregator import ItemFeatureAggregator
from feature_store.bench import bench_freshness
from feature_store.consumer import FeatureStoreConsumer
from feature_store.inputs import INTERACTIONS_TOPIC, ResultEngaged, ResultsShown, dumps
from tests.feature_store.conftest import unique_project


def test_the_consumer_feeds_the_store_and_dead_letters_what_it_refuses(make_sqlite_store):
    store = make_sqlite_store()
    bus = InMemoryBus(partitions=2)
    producer = bus.producer()
    t = time.time() - 60
    producer.publish(CATALOG_ITEMS, "a", event_to_bytes(ItemUpserted(
        item_id="a", version=3, title="A", category_path=("Fruit", "Apple"), images=["a.jpg"], price=2.0,
        event_time=t - 100)))
    producer.publish(CATALOG_ITEMS, "a", event_to_bytes(ItemDeleted(item_id="gone", version=1, event_time=t)))
    producer.publish(CATALOG_ITEMS, "a", b"not json")  # the dispatcher's to dead-letter, not ours
    producer.publish(CATALOG_FEATURES, "a", event_to_bytes(ItemFeaturesUpdated(
        item_id="a", event_time=t - 50, counters={"impressions": 5, "rating": 4.0})))
    producer.publish(CATALOG_FEATURES, "a", b'{"type": "item_features_updated", "item_id": "a", '
                                            b'"event_time": 1.0, "counters": {"orders": -2}}')
    producer.publish(INTERACTIONS_TOPIC, "a", dumps(ResultsShown(
        event_id="imp-1", request_id="r1", query_id="q1", item_ids=("a", "b"), positions=(0, 1),
        scores=(0.9, 0.4), model_version="m", ranker_version="visual", event_time=t)))
    producer.publish(INTERACTIONS_TOPIC, "a", dumps(ResultEngaged(
        event_id="clk-1", request_id="r1", kind="click", item_id="a", event_time=t + 1)))
    producer.publish(INTERACTIONS_TOPIC, "a", b'{"kind": "hover", "event_id": "h", "request_id": "r", '
                                              b'"item_id": "a", "event_time": 1.0}')
    producer.flush()

    agg = ItemFeatureAggregator(store)
    topics = [CATALOG_FEATURES, INTERACTIONS_TOPIC, CATALOG_ITEMS]
    crashing = FeatureStoreConsumer(bus.consumer(topics, "fs"), agg, producer)

    def crash(offsets):
        raise RuntimeError("killed before the commit")

    crashing.consumer.commit = crash
    with pytest.raises(RuntimeError):
        crashing.step(timeout=0.1)
    # a restarted consumer of the same group gets the same records again
    consumer = FeatureStoreConsumer(bus.consumer(topics, "fs"), agg, producer)
    assert consumer.step(timeout=0.1) == 8
    assert consumer.last_report.duplicates == 4 and consumer.last_report.accepted == 0
    got = store.online(["a", "b"])
    assert (got["a"]["impressions_1d"], got["a"]["clicks_1d"], got["b"]["impressions_1d"]) == (1, 1, 1)
    assert (got["a"]["price"], got["a"]["rating"]) == (2.0, 4.0)
    letters = sorted((read(r).source_topic, read(r).reason) for r in bus.records(CATALOG_ITEMS_DLQ))
    # both attempts dead-lettered the two refused records (a dead letter is at least once, like its record)
    assert letters == [(CATALOG_FEATURES, "negative_count")] * 2 + [(INTERACTIONS_TOPIC, "unknown_kind")] * 2
    assert consumer.step(timeout=0.05) == 0  # committed
    agg.close()


def test_an_interaction_is_an_online_feature_within_two_seconds(make_store):
    writer = make_store(project=(project := unique_project("fresh")))
    reader = make_store(project=project)  # as the API process would
    report = bench_freshness(writer, reader, lambda s: ItemFeatureAggregator(s), events=15, gap_s=0.01)
    assert report["not_visible_within_s"] == {"5.0": 0}
    assert report["event_to_online_visible"]["p99_ms"] < 2000, report
