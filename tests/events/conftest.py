"""Fixtures for the event bus tests.

``tansu_broker`` (session scope) runs one real Tansu broker on a free loopback port for the whole
test session; tests isolate themselves with their own topics (``new_topic``) and consumer groups.
``bus`` runs a test over both bus implementations (in-memory and Kafka/Tansu), as the qdrant-client
congruence tests do.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from events.bus import EventConsumer, EventProducer, InMemoryBus
from events.kafka import KafkaEventConsumer, KafkaEventProducer, KafkaSettings, create_topics
from infra.tansu import TansuBroker

# Group joins on Tansu take about half the session timeout: keep it short in tests.
TEST_KAFKA = dict(session_timeout_ms=3000, heartbeat_interval_ms=500, request_timeout_ms=5000)


@pytest.fixture(scope="session")
def tansu_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TansuBroker]:
    log_path = tmp_path_factory.mktemp("tansu") / "tansu.log"
    with TansuBroker(log_path=log_path) as broker:
        yield broker


@pytest.fixture(scope="session")
def kafka_settings(tansu_broker: TansuBroker) -> KafkaSettings:
    return tansu_broker.kafka_settings(**TEST_KAFKA)


_counter = itertools.count()


def unique(prefix: str) -> str:
    return f"{prefix}-{next(_counter)}-{uuid.uuid4().hex[:6]}"


@dataclass
class Bus:
    """One implementation of the bus, with what tests need to set it up."""

    kind: str
    memory: InMemoryBus | None = None
    settings: KafkaSettings | None = None

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
        return KafkaEventProducer(self.settings)

    def consumer(self, topics: list[str], group: str, **kw: Any) -> EventConsumer:
        if self.memory is not None:
            return self.memory.consumer(topics, group)
        return KafkaEventConsumer(topics, group, self.settings, **kw)


@pytest.fixture(params=["memory", "kafka"])
def bus(request: pytest.FixtureRequest) -> Bus:
    if request.param == "memory":
        return Bus("memory", memory=InMemoryBus(partitions=3))
    return Bus("kafka", settings=request.getfixturevalue("kafka_settings"))


def drain(consumer: EventConsumer, n: int, timeout: float = 15.0) -> list:
    """Poll until ``n`` records arrived (or ``timeout``); a Kafka group join takes ~1.5 s here."""
    import time

    out: list = []
    deadline = time.monotonic() + timeout
    while len(out) < n and time.monotonic() < deadline:
        out += consumer.poll(n - len(out), timeout=0.2)
    return out
