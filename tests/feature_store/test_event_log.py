"""The feature route's keeper: ``catalog.features`` → an append-only log, durable before the
commit, a redelivered record written once, records that are not feature events dead-lettered."""

from __future__ import annotations

import json

import pytest

from events.bus import InMemoryBus, Record
from events.deadletter import read
from events.models import ItemFeaturesUpdated, ItemUpserted, event_to_bytes
from feature_store.event_log import FeatureEventLog, FeatureLogConsumer, FeatureLogSettings


def feat(item: str, clicks: int, t: float = 1.0) -> ItemFeaturesUpdated:
    return ItemFeaturesUpdated(item_id=item, event_time=t, counters={"clicks": clicks})


def test_append_is_durable_and_a_redelivered_record_counts_once(tmp_path):
    log = FeatureEventLog(tmp_path / "f.jsonl")
    r1 = Record("catalog.features", 0, 7, b"a", event_to_bytes(feat("a", 1)))
    r2 = Record("catalog.features", 0, 8, b"b", event_to_bytes(feat("b", 2)))
    assert log.append([(r1, feat("a", 1)), (r2, feat("b", 2))]) == 2
    assert log.append([(r1, feat("a", 1))]) == 0  # the same record again: a redelivery
    reopened = FeatureEventLog(tmp_path / "f.jsonl")  # after a restart too
    assert reopened.append([(r2, feat("b", 2))]) == 0
    # a new record at an offset seen before (a broker that forgot its log) is kept
    r3 = Record("catalog.features", 0, 7, b"a", event_to_bytes(feat("a", 5)))
    assert reopened.append([(r3, feat("a", 5))]) == 1
    assert [(e.item_id, e.counters.clicks) for e in reopened.events()] == [("a", 1), ("b", 2), ("a", 5)]


def test_a_torn_last_line_is_skipped(tmp_path):
    path = tmp_path / "f.jsonl"
    log = FeatureEventLog(path)
    log.append([(Record("t", 0, 0, b"a", event_to_bytes(feat("a", 1))), feat("a", 1))])
    with path.open("a") as f:
        f.write('{"source": "t/0/1", "dig')  # a crash mid-write
    assert [e.item_id for e in FeatureEventLog(path).events()] == ["a"]


def test_the_consumer_logs_feature_events_and_dead_letters_the_rest(tmp_path):
    bus = InMemoryBus(partitions=2)
    bus.create_topic("catalog.items.dlq", 1)
    s = FeatureLogSettings(path=tmp_path / "f.jsonl", metrics_port=0)
    values = [event_to_bytes(feat("a", 1)), b"{not json",
              event_to_bytes(ItemUpserted(item_id="u", version=1, title="t", category_path=("c",), images=("x",))),
              event_to_bytes(feat("b", 3))]
    with bus.producer() as p:
        for v in values:
            p.publish(s.topic, "k", v)
    consumer = FeatureLogConsumer(bus.consumer([s.topic], s.group_id), FeatureEventLog(s.path), bus.producer(), s)
    consumer.run(idle_timeout=0.2)
    assert sorted(e.item_id for e in consumer.log.events()) == ["a", "b"]
    letters = [read(r) for r in bus.records("catalog.items.dlq")]
    assert sorted(d.reason for d in letters) == ["malformed_json", "not_a_feature_event"]
    assert all(d.stage == "features" and d.source_topic == s.topic for d in letters)
    for tp in bus.partitions(s.topic):  # committed to the end
        assert (consumer.consumer.committed(tp) or 0) == bus.consumer([s.topic], "probe").highwater(tp)

    # a consumer that restarts before its commit gets the records again: they are not logged twice
    again = FeatureLogConsumer(bus.consumer([s.topic], "another-group"), FeatureEventLog(s.path), bus.producer(), s)
    again.run(idle_timeout=0.2)
    assert sorted(e.item_id for e in again.log.events()) == ["a", "b"]
    lines = [json.loads(x) for x in s.path.read_text().splitlines()]
    assert len(lines) == 2 and all(line["source"].startswith(f"{s.topic}/") for line in lines)


@pytest.mark.integration
def test_the_consumer_on_kafka(tmp_path, kafka_settings):
    from events.kafka import KafkaEventConsumer, KafkaEventProducer, create_topics
    from tests.events.conftest import unique

    topic, dlq = unique("features"), unique("dlq")
    create_topics(kafka_settings, {topic: 2, dlq: 1})
    s = FeatureLogSettings(path=tmp_path / "f.jsonl", topic=topic, dlq_topic=dlq, group_id=unique("g"), metrics_port=0)
    producer = KafkaEventProducer(kafka_settings)
    try:
        for i in range(5):
            producer.publish(topic, f"i{i}", event_to_bytes(feat(f"i{i}", i)))
        producer.flush(10)
        consumer = FeatureLogConsumer(KafkaEventConsumer([topic], s.group_id, kafka_settings), FeatureEventLog(s.path),
                                      producer, s)
        try:
            deadline = 0
            while len(consumer.log.events()) < 5 and deadline < 60:
                consumer.step(timeout=0.5)
                deadline += 1
        finally:
            consumer.consumer.close()
    finally:
        producer.close()
    assert sorted(e.item_id for e in FeatureEventLog(s.path).events()) == [f"i{i}" for i in range(5)]
