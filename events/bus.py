"""The event bus, as the rest of tongkuan sees it: one small producer and one small consumer interface.

Two implementations share these interfaces (as ``qdrant-client`` does with local/remote):

- ``InMemoryBus`` (here): an in-process log per topic partition, for the embedded mode and unit tests.
- ``events.kafka``: kafka-python against Apache Kafka or the Tansu test broker.

Semantics both keep, and the tests in ``tests/events/`` check over both:

- ``EventProducer.publish`` only enqueues; ``flush`` returns once every enqueued record is durably
  acknowledged (acks=all) and raises ``PublishError`` if any was not. Callers that must not claim
  success early (the hook, the dispatcher's dead-lettering) publish, then flush, then answer.
- Records with the same key go to the same partition (per-item order).
- ``EventConsumer`` never commits on its own. ``commit`` takes the *next* offset to read per
  partition (last processed offset + 1), as Kafka does; a consumer that restarts in the same group
  resumes there. ``seek`` rewinds for a retry without a restart.
"""

from __future__ import annotations

import threading
import time
import zlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

Headers = Mapping[str, bytes | str] | Iterable[tuple[str, bytes | str]]


class TopicPartition(NamedTuple):
    topic: str
    partition: int


@dataclass(frozen=True)
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...] = ()
    timestamp_ms: int | None = None

    @property
    def tp(self) -> TopicPartition:
        return TopicPartition(self.topic, self.partition)

    def header(self, name: str) -> bytes | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None


class PublishError(RuntimeError):
    """At least one record was not acknowledged by the bus; nothing may be claimed as published."""


class EventProducer(ABC):
    @abstractmethod
    def publish(
        self, topic: str, key: str | bytes | None, value: bytes, headers: Headers | None = None
    ) -> None:
        """Enqueue one record. Raises ``PublishError`` only for immediate refusals (e.g. too large)."""

    @abstractmethod
    def flush(self, timeout: float | None = None) -> None:
        """Block until every enqueued record is acknowledged; raise ``PublishError`` if any failed."""

    def close(self) -> None:  # noqa: B027 - optional for implementations without resources
        """Release connections; flushes first where the implementation buffers."""

    def __enter__(self) -> EventProducer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EventConsumer(ABC):
    @abstractmethod
    def poll(self, max_records: int, timeout: float) -> list[Record]:
        """Up to ``max_records`` records, waiting at most ``timeout`` seconds for the first one."""

    @abstractmethod
    def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        """Commit the next offset to read per partition (last processed + 1). Synchronous."""

    @abstractmethod
    def committed(self, tp: TopicPartition) -> int | None: ...

    @abstractmethod
    def seek(self, tp: TopicPartition, offset: int) -> None:
        """Make the next ``poll`` return records of ``tp`` from ``offset`` on."""

    @abstractmethod
    def assignment(self) -> set[TopicPartition]: ...

    @abstractmethod
    def highwater(self, tp: TopicPartition) -> int | None:
        """Offset after the last record in ``tp`` as last seen by this consumer (None if unknown).

        For Kafka this is the high watermark carried by fetch responses, *not* a ListOffsets
        request: Tansu answers ListOffsets(latest) with a wrong value after batched produces (the
        last batch's base offset + 1), but its fetch responses carry the right high watermark.
        """

    @abstractmethod
    def pause(self) -> None:
        """Stop returning records (polls still keep the group membership alive)."""

    @abstractmethod
    def resume(self) -> None: ...

    def close(self) -> None:  # noqa: B027
        """Leave the group without committing anything."""

    def __enter__(self) -> EventConsumer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LazyProducer(EventProducer):
    """A producer made on the first ``publish``: a worker whose batches are clean never needs the
    broker connection it would use for dead letters, and an API that only searches starts and
    serves without a reachable broker. A failure to make it is a ``PublishError`` for that publish
    (the hook answers 503), and the next publish tries again."""

    def __init__(self, factory: Callable[[], EventProducer]) -> None:
        self._factory = factory
        self._producer: EventProducer | None = None
        self._lock = threading.Lock()

    def _get(self) -> EventProducer:
        with self._lock:
            if self._producer is None:
                try:
                    self._producer = self._factory()
                except PublishError:
                    raise
                except Exception as e:  # noqa: BLE001 - e.g. kafka-python's NoBrokersAvailable
                    raise PublishError(f"no producer: {type(e).__name__}: {e}") from e
            return self._producer

    def publish(self, topic: str, key: str | bytes | None, value: bytes, headers: Headers | None = None) -> None:
        self._get().publish(topic, key, value, headers)

    def flush(self, timeout: float | None = None) -> None:
        if self._producer is not None:
            self._producer.flush(timeout)

    def close(self) -> None:
        if self._producer is not None:
            self._producer.close()


def _norm_headers(headers: Headers | None) -> tuple[tuple[str, bytes], ...]:
    if not headers:
        return ()
    items = headers.items() if isinstance(headers, Mapping) else headers
    return tuple((k, v.encode() if isinstance(v, str) else bytes(v)) for k, v in items)


def _key_bytes(key: str | bytes | None) -> bytes | None:
    return key.encode() if isinstance(key, str) else key


def partition_for(key: bytes | None, partitions: int, counter: int = 0) -> int:
    """Stable key → partition for the in-memory bus (crc32; Kafka's own client uses murmur2)."""
    if key is None:
        return counter % partitions
    return zlib.crc32(key) % partitions


# --------------------------------------------------------------------------------------------------
# In-memory implementation


@dataclass
class _Group:
    committed: dict[TopicPartition, int] = field(default_factory=dict)


class InMemoryBus:
    """A process-local broker: topics of N partitions, append-only logs, consumer-group offsets.

    One consumer per group owns every partition of its topics (no rebalancing). Thread-safe.
    """

    def __init__(self, partitions: int = 3) -> None:
        self.default_partitions = partitions
        self._logs: dict[TopicPartition, list[Record]] = {}
        self._topics: dict[str, int] = {}
        self._groups: dict[str, _Group] = {}
        self._lock = threading.Condition()
        self._rr = 0

    def create_topic(self, topic: str, partitions: int | None = None) -> None:
        with self._lock:
            if topic in self._topics:
                return
            n = partitions or self.default_partitions
            self._topics[topic] = n
            for p in range(n):
                self._logs[TopicPartition(topic, p)] = []

    def partitions(self, topic: str) -> list[TopicPartition]:
        self.create_topic(topic)
        return [TopicPartition(topic, p) for p in range(self._topics[topic])]

    def records(self, topic: str) -> list[Record]:
        """Every record of ``topic`` (all partitions), for tests and the embedded mode."""
        with self._lock:
            out = [r for tp, log in self._logs.items() if tp.topic == topic for r in log]
        return sorted(out, key=lambda r: (r.timestamp_ms or 0, r.partition, r.offset))

    def append(
        self, topic: str, key: bytes | None, value: bytes, headers: tuple[tuple[str, bytes], ...]
    ) -> Record:
        self.create_topic(topic)
        with self._lock:
            self._rr += 1
            part = partition_for(key, self._topics[topic], self._rr)
            log = self._logs[TopicPartition(topic, part)]
            rec = Record(topic, part, len(log), key, value, headers, int(time.time() * 1000))
            log.append(rec)
            self._lock.notify_all()
            return rec

    def producer(self) -> InMemoryProducer:
        return InMemoryProducer(self)

    def consumer(self, topics: Iterable[str], group_id: str) -> InMemoryConsumer:
        return InMemoryConsumer(self, list(topics), group_id)


class InMemoryProducer(EventProducer):
    def __init__(self, bus: InMemoryBus, max_record_bytes: int = 1024 * 1024) -> None:
        self.bus = bus
        self.max_record_bytes = max_record_bytes
        self._pending: list[tuple[str, bytes | None, bytes, tuple[tuple[str, bytes], ...]]] = []
        self._lock = threading.Lock()

    def publish(
        self, topic: str, key: str | bytes | None, value: bytes, headers: Headers | None = None
    ) -> None:
        if len(value) > self.max_record_bytes:
            raise PublishError(f"record of {len(value)} bytes exceeds {self.max_record_bytes}")
        with self._lock:
            self._pending.append((topic, _key_bytes(key), value, _norm_headers(headers)))

    def flush(self, timeout: float | None = None) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for topic, key, value, headers in pending:
            self.bus.append(topic, key, value, headers)

    def close(self) -> None:
        self.flush()


class InMemoryConsumer(EventConsumer):
    def __init__(self, bus: InMemoryBus, topics: list[str], group_id: str) -> None:
        self.bus = bus
        self.group_id = group_id
        self._tps = [tp for t in topics for tp in bus.partitions(t)]
        with bus._lock:
            group = bus._groups.setdefault(group_id, _Group())
            # Start at the committed offset, else the beginning (auto_offset_reset="earliest").
            self._position = {tp: group.committed.get(tp, 0) for tp in self._tps}
        self._paused = False
        self._closed = False

    def poll(self, max_records: int, timeout: float) -> list[Record]:
        deadline = time.monotonic() + timeout
        with self.bus._lock:
            while True:
                out: list[Record] = []
                if not self._paused and not self._closed:
                    for tp in self._tps:
                        log = self.bus._logs[tp]
                        take = log[self._position[tp] : self._position[tp] + max_records - len(out)]
                        out += take
                        self._position[tp] += len(take)
                        if len(out) >= max_records:
                            break
                left = deadline - time.monotonic()
                if out or left <= 0:
                    return out
                self.bus._lock.wait(left)

    def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        with self.bus._lock:
            self.bus._groups[self.group_id].committed.update(offsets)

    def committed(self, tp: TopicPartition) -> int | None:
        with self.bus._lock:
            return self.bus._groups[self.group_id].committed.get(tp)

    def seek(self, tp: TopicPartition, offset: int) -> None:
        with self.bus._lock:
            self._position[tp] = offset

    def assignment(self) -> set[TopicPartition]:
        return set(self._tps)

    def highwater(self, tp: TopicPartition) -> int | None:
        with self.bus._lock:
            log = self.bus._logs.get(tp)
            return None if log is None else len(log)

    def pause(self) -> None:
        self._paused = True

    def resume(self) -> None:
        self._paused = False

    def close(self) -> None:
        self._closed = True


__all__ = [
    "EventConsumer",
    "EventProducer",
    "InMemoryBus",
    "InMemoryConsumer",
    "InMemoryProducer",
    "LazyProducer",
    "PublishError",
    "Record",
    "TopicPartition",
]
