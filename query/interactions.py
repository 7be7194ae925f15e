"""The interaction log: what shoppers were shown and what they did with it, for the feature store
and the re-ranker's training rows.

Every search response is one ``ResultsShown`` (an impression of each hit of the main product, with
its position and score, the model and the ranker that ordered them); ``POST /v1/feedback`` records a
``ResultEngaged`` (click, add to cart, order) against a request id and one of the items that request
showed. Both go to ``search.interactions`` (the models and the topic are the feature store's input
contract, ``feature_store.inputs``):

* ``BusSink``: the event bus (Kafka in the stack), keyed by request id so a request's events stay in
  order; flushed on a timer, never on the request's path.
* ``FileSink``: a local append-only JSONL file in the embedded mode, one line per event.

``RequestLedger`` remembers which items each recent request showed, so feedback for an unknown
request or an item it never showed is refused (404 ``unknown_request`` / 422 ``not_shown``):
``MemoryLedger`` in one process, ``RedisLedger`` across API processes. Recording never fails a
search: a sink that refuses is counted (``tongkuan_interactions_total{outcome="dropped"}``) and
logged, and the search is answered as usual.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from prometheus_client import Counter
from pydantic import BaseModel, ConfigDict, Field

from events.bus import EventProducer
from feature_store.inputs import INTERACTIONS_TOPIC, ResultEngaged, ResultsShown
from query.models import SearchResponse

log = logging.getLogger(__name__)

VAR_DIR = Path(__file__).resolve().parent.parent / "var"
INTERACTIONS = Counter("tongkuan_interactions_total", "Interaction events by kind (impression, click, add_to_cart, "
                       "order) and outcome (recorded, dropped: the sink refused)", ["kind", "outcome"])

Interaction = ResultsShown | ResultEngaged


class UnknownRequest(LookupError):
    """Feedback for a request id this deployment did not answer (or has forgotten: ``ttl_s``)."""


class NotShown(ValueError):
    """Feedback for an item the request did not show."""


# --- where the events go ------------------------------------------------------------------------

class InteractionSink(ABC):
    @abstractmethod
    def write(self, event: Interaction) -> None:
        """Append one event (may buffer); raises on a refusal."""

    def close(self) -> None:  # noqa: B027 - optional
        """Flush and release."""


def _line(event: Interaction) -> bytes:
    return event.model_dump_json().encode()


class BusSink(InteractionSink):
    """``search.interactions`` on the event bus, flushed every ``flush_s`` by a daemon thread."""

    def __init__(self, producer: EventProducer, topic: str = INTERACTIONS_TOPIC, flush_s: float = 0.5):
        self.producer, self.topic = producer, topic
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._flusher, args=(flush_s,), name="interactions-flush", daemon=True)
        self._thread.start()

    def write(self, event: Interaction) -> None:
        self.producer.publish(self.topic, event.request_id, _line(event), {"kind": event.kind})

    def _flusher(self, every: float) -> None:
        while not self._stop.wait(every):
            try:
                self.producer.flush(timeout=10)
            except Exception as e:  # noqa: BLE001 - counted and logged; the next flush tries again
                INTERACTIONS.labels("any", "dropped").inc()
                log.warning("interaction events not acknowledged: %s", e)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            self.producer.flush(timeout=10)
        except Exception as e:  # noqa: BLE001
            log.warning("interaction events not acknowledged at close: %s", e)


class FileSink(InteractionSink):
    """One JSON line per event, appended (``O_APPEND``: whole lines even with several processes);
    fsynced every ``fsync_s`` and at close."""

    def __init__(self, path: str | os.PathLike[str], fsync_s: float = 1.0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._lock = threading.Lock()
        self._fsync_s, self._synced = fsync_s, time.monotonic()

    def write(self, event: Interaction) -> None:
        data = _line(event) + b"\n"
        with self._lock:
            os.write(self._fd, data)
            if time.monotonic() - self._synced >= self._fsync_s:
                os.fsync(self._fd)
                self._synced = time.monotonic()

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.fsync(self._fd)
                os.close(self._fd)
                self._fd = -1


def read_log(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The events of a ``FileSink`` file, in order (for tests, backfills and the simulator)."""
    p = Path(path)
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]


# --- which request showed what -------------------------------------------------------------------

class RequestLedger(ABC):
    @abstractmethod
    def remember(self, request_id: str, item_ids: Sequence[str]) -> None: ...

    @abstractmethod
    def shown(self, request_id: str) -> list[str] | None:
        """The items the request showed; None for an unknown (or expired) request."""


class MemoryLedger(RequestLedger):
    """The last ``max_requests`` requests of this process, each for ``ttl_s``."""

    def __init__(self, max_requests: int = 100_000, ttl_s: float = 24 * 3600):
        self.max_requests, self.ttl_s = max_requests, ttl_s
        self._seen: OrderedDict[str, tuple[float, tuple[str, ...]]] = OrderedDict()
        self._lock = threading.Lock()

    def remember(self, request_id: str, item_ids: Sequence[str]) -> None:
        with self._lock:
            self._seen[request_id] = (time.monotonic() + self.ttl_s, tuple(item_ids))
            while len(self._seen) > self.max_requests:
                self._seen.popitem(last=False)

    def shown(self, request_id: str) -> list[str] | None:
        with self._lock:
            entry = self._seen.get(request_id)
            if entry is None or entry[0] < time.monotonic():
                return None
            return list(entry[1])


class RedisLedger(RequestLedger):
    """Requests in Redis (``tongkuan:request:<id>``, expiring after ``ttl_s``): every API process
    behind one load balancer accepts feedback for any of them."""

    PREFIX = "tongkuan:request:"

    def __init__(self, client: Any, ttl_s: int = 24 * 3600):
        self.client, self.ttl_s = client, ttl_s

    def remember(self, request_id: str, item_ids: Sequence[str]) -> None:
        self.client.set(self.PREFIX + request_id, json.dumps(list(item_ids)), ex=self.ttl_s)

    def shown(self, request_id: str) -> list[str] | None:
        raw = self.client.get(self.PREFIX + request_id)
        return None if raw is None else list(json.loads(raw))


# --- the recorder ----------------------------------------------------------------------------------

class InteractionSettings(BaseModel):
    """The interaction log (env ``TONGKUAN_INTERACTIONS__*``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sink: Literal["file", "kafka", "off"] = Field(default="file", description="where impressions and feedback "
                                                 "go: a local append-only file (embedded), the search.interactions "
                                                 "topic (the stack), or nowhere (feedback answers 503)")
    path: Path = Field(default=VAR_DIR / "interactions" / "events.jsonl", description="the file sink's log")
    topic: str = Field(default=INTERACTIONS_TOPIC, description="the kafka sink's topic")
    ledger: Literal["memory", "redis"] = Field(default="memory", description="where the shown items of recent "
                                               "requests are kept for feedback checks (redis: across API processes)")
    ledger_ttl_s: int = Field(default=24 * 3600, ge=60, description="how long a request accepts feedback")


def query_id(image: bytes | None, text: str | None) -> str:
    """The same query (same picture bytes and text) gets the same id, across requests and shoppers."""
    h = hashlib.sha256()
    h.update(image or b"")
    h.update(b"\0" + (text or "").strip().lower().encode())
    return h.hexdigest()[:24]


class Interactions:
    def __init__(self, sink: InteractionSink, ledger: RequestLedger):
        self.sink, self.ledger = sink, ledger

    def shown(self, resp: SearchResponse, qid: str) -> None:
        """Record ``resp``'s main product as shown. Never raises: a refusal is counted and logged."""
        hits = resp.objects[0].hits if resp.objects else []
        ids = list(dict.fromkeys(h.item_id for h in hits))
        scores = {h.item_id: h.score for h in reversed(hits)}
        try:
            self.ledger.remember(resp.request_id, ids)
            if ids:
                self.sink.write(ResultsShown(
                    event_id=f"{resp.request_id}:shown", request_id=resp.request_id, event_time=time.time(),
                    query_id=qid, item_ids=tuple(ids), positions=tuple(range(len(ids))),
                    scores=tuple(float(scores[i]) for i in ids), model_version=resp.model_id or "unknown",
                    ranker_version=resp.ranker or "visual"))
        except Exception as e:  # noqa: BLE001 - the shopper's search is answered whatever the log does
            INTERACTIONS.labels("impression", "dropped").inc()
            log.warning("impression of %s not recorded: %s: %s", resp.request_id, type(e).__name__, e)
            return
        INTERACTIONS.labels("impression", "recorded").inc()

    def engaged(self, request_id: str, item_id: str, kind: str, *, amount: float | None = None,
                event_id: str | None = None, event_time: float | None = None) -> ResultEngaged:
        """Validate and record one feedback event; raises ``UnknownRequest`` / ``NotShown``, a
        pydantic ``ValidationError`` for a bad value, or the sink's error (the caller answers 503)."""
        shown = self.ledger.shown(request_id)
        if shown is None:
            raise UnknownRequest(request_id)
        if item_id not in shown:
            raise NotShown(f"request {request_id} did not show {item_id!r}")
        event = ResultEngaged(event_id=event_id or uuid.uuid4().hex, request_id=request_id, kind=kind,
                              item_id=item_id, amount=amount,
                              event_time=time.time() if event_time is None else event_time)
        self.sink.write(event)
        INTERACTIONS.labels(kind, "recorded").inc()
        return event

    def close(self) -> None:
        self.sink.close()


def interactions_from_settings(settings: InteractionSettings, *, producer: EventProducer | None = None,
                               redis_url: str = "") -> Interactions | None:
    """The recorder a process's settings ask for (None: ``sink="off"``)."""
    if settings.sink == "off":
        return None
    if settings.sink == "kafka":
        if producer is None:
            raise ValueError("the kafka interaction sink needs the API's event producer")
        sink: InteractionSink = BusSink(producer, settings.topic)
    else:
        sink = FileSink(settings.path)
    if settings.ledger == "redis":
        import redis

        ledger: RequestLedger = RedisLedger(redis.Redis.from_url(redis_url, socket_timeout=2,
                                                                 socket_connect_timeout=2), settings.ledger_ttl_s)
    else:
        ledger = MemoryLedger(ttl_s=settings.ledger_ttl_s)
    return Interactions(sink, ledger)


__all__ = ["BusSink", "FileSink", "InteractionSettings", "Interactions", "MemoryLedger", "NotShown",
           "RedisLedger", "RequestLedger", "UnknownRequest", "interactions_from_settings", "query_id", "read_log"]
