"""The feature route's keeper until the feature store exists: ``catalog.features`` → an
append-only local log, so that no ``ItemFeaturesUpdated`` is dropped on the way.

``FeatureEventLog(path)``: one JSON line per event, ``{"source", "digest", "received_at",
"event"}``; ``append`` fsyncs before it returns. A line's identity is its record's source
(topic/partition/offset) *and* the sha256 of its bytes, so a redelivered record (a consumer that
crashed between the append and the commit) is not written twice, while a new record that happens
to land at an old offset (Tansu forgets its topics on a restart) is. ``FeatureLogConsumer`` polls
the feature topic and commits its offsets only after the lines are on disk.

The feature-store issue replaces the log with Feast push sources; the consumer's sink is the seam.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from prometheus_client import Counter
from pydantic import BaseModel, ConfigDict, Field

from events.bus import EventConsumer, EventProducer, Record, TopicPartition
from events.contract import Rejected, parse_record
from events.deadletter import DeadLetter, publish
from events.models import ItemFeaturesUpdated
from events.topics import CATALOG_FEATURES, CATALOG_ITEMS_DLQ

log = logging.getLogger(__name__)

VAR_DIR = Path(__file__).resolve().parent.parent / "var"

EVENTS = Counter("tongkuan_features_events", "Records of the feature topic, by outcome: logged, duplicate "
                 "(a redelivery already in the log), dead_lettered.", ["outcome"])


class FeatureLogSettings(BaseModel):
    """The feature-event log (env ``TONGKUAN_FEATURES__*``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: Path = Field(default=VAR_DIR / "features" / "events.jsonl", description="the append-only log")
    topic: str = Field(default=CATALOG_FEATURES, description="topic of the feature events")
    group_id: str = Field(default="tongkuan-features", description="Kafka consumer group")
    dlq_topic: str = Field(default=CATALOG_ITEMS_DLQ, description="where records that are not feature events go")
    max_batch: int = Field(default=500, ge=1, description="records per poll and fsync")
    metrics_port: int = Field(default=9104, ge=0, le=65535, description="/metrics port (0: off)")
    metrics_addr: str = Field(default="127.0.0.1", description="/metrics address")


def _identity(source: str, digest: str) -> tuple[str, str]:
    return source, digest


class FeatureEventLog:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._seen: set[tuple[str, str]] = set()
        for line in self.lines():
            self._seen.add(_identity(line["source"], line["digest"]))

    def lines(self) -> Iterator[dict]:
        """Every line written so far (a torn last line, from a crash mid-write, is skipped)."""
        if not self.path.exists():
            return
        with self.path.open(encoding="utf-8") as f:
            for text in f:
                try:
                    yield json.loads(text)
                except json.JSONDecodeError:
                    log.warning("%s: skipping a torn line", self.path)

    def events(self) -> list[ItemFeaturesUpdated]:
        return [ItemFeaturesUpdated.model_validate(line["event"]) for line in self.lines()]

    def append(self, records: Sequence[tuple[Record, ItemFeaturesUpdated]]) -> int:
        """Append the events not already in the log; durable on return. Returns how many were new."""
        out = []
        with self._lock:
            for rec, event in records:
                source = f"{rec.topic}/{rec.partition}/{rec.offset}"
                digest = hashlib.sha256(rec.value or b"").hexdigest()[:32]
                key = _identity(source, digest)
                if key in self._seen:
                    continue
                self._seen.add(key)
                out.append(json.dumps({"source": source, "digest": digest, "received_at": time.time(),
                                       "event": event.model_dump(mode="json")}, separators=(",", ":")))
            if out:
                with self.path.open("a", encoding="utf-8") as f:
                    f.write("\n".join(out) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
        return len(out)


class FeatureLogConsumer:
    """``settings.topic`` → ``FeatureEventLog``. A record that is not a feature event is
    dead-lettered (reason from ``events.contract``, or ``not_a_feature_event``); offsets are
    committed after the log and the dead letters are durable."""

    def __init__(self, consumer: EventConsumer, log_: FeatureEventLog, dlq: EventProducer,
                 settings: FeatureLogSettings) -> None:
        self.consumer, self.log, self.dlq, self.settings = consumer, log_, dlq, settings
        self.stop_event = threading.Event()

    def step(self, timeout: float = 0.5) -> int:
        """One poll: returns how many records it consumed (and committed)."""
        records = self.consumer.poll(self.settings.max_batch, timeout=timeout)
        if not records:
            return 0
        good: list[tuple[Record, ItemFeaturesUpdated]] = []
        letters = []
        for rec in records:
            parsed = parse_record(rec.value)
            if isinstance(parsed, ItemFeaturesUpdated):
                good.append((rec, parsed))
                continue
            reason, detail = ((parsed.reason, parsed.detail) if isinstance(parsed, Rejected)
                              else ("not_a_feature_event", f"a {parsed.type} on {rec.topic}"))
            letters.append(DeadLetter.of_record(rec, reason=reason, detail=detail, stage="features"))
        logged = self.log.append(good)
        EVENTS.labels(outcome="logged").inc(logged)
        EVENTS.labels(outcome="duplicate").inc(len(good) - logged)
        EVENTS.labels(outcome="dead_lettered").inc(len(letters))
        if letters:
            publish(self.dlq, self.settings.dlq_topic, letters)
            self.dlq.flush(10.0)
        offsets: dict[TopicPartition, int] = {}
        for rec in records:
            offsets[rec.tp] = max(offsets.get(rec.tp, 0), rec.offset + 1)
        self.consumer.commit(offsets)
        return len(records)

    def run(self, idle_timeout: float | None = None) -> None:
        idle_since = time.monotonic()
        while not self.stop_event.is_set():
            if self.step():
                idle_since = time.monotonic()
            elif idle_timeout is not None and time.monotonic() - idle_since > idle_timeout:
                return

    def stop(self) -> None:
        self.stop_event.set()


__all__ = ["FeatureEventLog", "FeatureLogConsumer", "FeatureLogSettings"]
