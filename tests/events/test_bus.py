"""The same behaviour from both bus implementations: in-memory and kafka-python against Tansu."""

from __future__ import annotations

import time
from collections import defaultdict

import pytest

from events.bus import InMemoryBus, PublishError, TopicPartition
from tests.events.conftest import Bus, drain, unique


def _publish(bus: Bus, topic: str, n: int, keys: int = 5) -> list[tuple[str, bytes]]:
    sent = [(f"item-{i % keys}", f"v{i}".encode()) for i in range(n)]
    with bus.producer() as p:
        for key, value in sent:
            p.publish(topic, key, value, {"type": "test", "n": value})
        p.flush(10)
    return sent


def test_round_trip_keeps_per_key_order_and_headers(bus: Bus) -> None:
    topic = bus.new_topic()
    sent = _publish(bus, topic, 30)
    with bus.consumer([topic], unique("g")) as c:
        got = drain(c, 30)
    assert len(got) == 30
    by_key: dict[bytes, list[bytes]] = defaultdict(list)
    partitions: dict[bytes, set[int]] = defaultdict(set)
    for r in sorted(got, key=lambda r: (r.partition, r.offset)):
        by_key[r.key].append(r.value)
        partitions[r.key].add(r.partition)
        assert r.header("type") == b"test" and r.header("n") == r.value
    for key in {k for k, _ in sent}:
        assert by_key[key.encode()] == [v for k, v in sent if k == key]  # per-key order
        assert len(partitions[key.encode()]) == 1  # one partition per key


def test_restart_resumes_after_committed_offset(bus: Bus) -> None:
    topic, group = bus.new_topic(partitions=1), unique("g")
    _publish(bus, topic, 10)
    with bus.consumer([topic], group) as c:
        first = drain(c, 4)[:4]
        tp = TopicPartition(topic, 0)
        c.commit({tp: first[-1].offset + 1})
        assert c.committed(tp) == first[-1].offset + 1
        drain(c, 6)  # read further but do not commit: redelivered after the restart
    with bus.consumer([topic], group) as c:
        rest = drain(c, 6)
    assert [r.value for r in rest] == [f"v{i}".encode() for i in range(4, 10)]


def test_seek_rewinds_and_highwater_counts_records(bus: Bus) -> None:
    topic = bus.new_topic(partitions=1)
    # Several flushes = several produce batches: the case where Tansu's ListOffsets goes wrong.
    for _ in range(3):
        _publish(bus, topic, 7)
    tp = TopicPartition(topic, 0)
    with bus.consumer([topic], unique("g")) as c:
        got = drain(c, 21)
        assert [r.offset for r in got] == list(range(21))
        assert c.highwater(tp) == 21
        c.seek(tp, 5)
        again = drain(c, 16)
        assert [r.offset for r in again] == list(range(5, 21))


def test_pause_returns_nothing_until_resumed(bus: Bus) -> None:
    topic = bus.new_topic(partitions=1)
    with bus.consumer([topic], unique("g")) as c:
        _publish(bus, topic, 1)
        assert len(drain(c, 1)) == 1  # joined and assigned
        _publish(bus, topic, 3)
        c.pause()
        deadline = time.monotonic() + 0.6
        while time.monotonic() < deadline:
            assert c.poll(10, timeout=0.1) == []
        c.resume()
        assert len(drain(c, 3)) == 3


def test_in_memory_producer_refuses_oversized_record() -> None:
    p = InMemoryBus().producer()
    p.max_record_bytes = 10
    with pytest.raises(PublishError):
        p.publish("t", "k", b"x" * 11)


def test_kafka_client_checksums_record_batches_in_c() -> None:
    """kafka-python computes a CRC-32C of every record batch it writes and checks one on every batch
    it reads. Without the ``crc32c`` package it falls back to pure Python (~4 MB/s of a core, paid
    by the dispatcher and every producer on the ingest machine's cores)."""
    from kafka.record import util

    assert util.crc32c_c is not None, "the crc32c package is missing: pip install -r requirements.lock"
    assert util.calc_crc32c(b"123456789") == 0xE3069283  # the standard CRC-32C check value
