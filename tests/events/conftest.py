"""Fixtures for the event bus tests.

``bus`` runs a test over both bus implementations (in-memory and Kafka on the session's Tansu
broker, ``tests/conftest.py``), as the qdrant-client congruence tests do; tests isolate themselves
with their own topics (``new_topic``) and consumer groups.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from events.bus import EventConsumer, EventProducer, InMemoryBus
from events.kafka import KafkaEventConsumer, KafkaEventProducer, KafkaSettings, create_topics

_counter = itertools.count()


def unique(prefix: str) -> str:
    return f"{prefix}-{next(_counter)}-{uuid.uuid4().hex[:6]}"


@dataclass
class Bus:
    """One implementation of the bus, with what tests need to set it up."""

    kind: str
    memory: InMemoryBus | None = None
    settings: KafkaSettings | None = None
    producers: list[EventProducer] = field(default_factory=list)  # closed when the test ends
    consumers: list[EventConsumer] = field(default_factory=list)  # likewise, if the test did not

    def new_topic(self, partitions: int = 3) -> str:
        name = unique("t")
        if self.memory is not None:
            self.memory.create_topic(name, partitions)
        else:
            create_topics(self.settings, {name: partitions})
        return name

    def producer(self) -> EventProducer:
        if self.memory is not None:
            return self.memory.producer()
        producer = KafkaEventProducer(self.settings)
        self.producers.append(producer)  # e.g. a dispatcher's: nothing else closes it
        return producer

    def consumer(self, topics: list[str], group: str, **kw: Any) -> EventConsumer:
        if self.memory is not None:
            return self.memory.consumer(topics, group)
        consumer = KafkaEventConsumer(topics, group, self.settings, **kw)
        self.consumers.append(consumer)
        return consumer


@pytest.fixture(params=["memory", "kafka"])
def bus(request: pytest.FixtureRequest) -> Iterator[Bus]:
    if request.param == "memory":
        yield Bus("memory", memory=InMemoryBus(partitions=3))
        return
    b = Bus("kafka", settings=request.getfixturevalue("kafka_settings"))
    yield b
    for client in [*b.consumers, *b.producers]:  # a second close is a no-op
        client.close()


def drain(consumer: EventConsumer, n: int, timeout: float = 15.0) -> list:
    """Poll until ``n`` records arrived (or ``timeout``); a Kafka group join takes ~1.5 s here."""
    import time

    out: list = []
    deadline = time.monotonic() + timeout
    while len(out) < n and time.monotonic() < deadline:
        out += consumer.poll(n - len(out), timeout=0.2)
    return out
