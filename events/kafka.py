"""kafka-python implementation of ``events.bus`` (Apache Kafka in production, Tansu in tests/make up).

Choices and their cost:
- Producer ``acks="all"`` with idempotence on (kafka-python >= 2.1 supports it and Tansu 0.6 accepts
  InitProducerId; tested in ``tests/events/test_bus.py``): broker-side retries cannot duplicate or
  reorder a partition's records. ``flush`` waits for every future and raises ``PublishError`` for
  any that failed, so callers only claim what the broker acknowledged.
- Consumer ``enable_auto_commit=False``; offsets are committed synchronously and explicitly.
- kafka-python 3.0.12 leaks sockets and threads on its failure paths, which ``filterwarnings =
  error`` turns into a random later test's failure when the collector finds them; each is closed
  here and shown in ``tests/events/test_kafka_clients.py``: a constructor whose bootstrap fails
  keeps its network client (built through ``open_client``), a failed or cancelled connect and a
  connection closed with a write still queued keep their sockets (patched on import), ``close()``
  stops half-way when the broker is gone (producer: its IO thread runs on; consumer: its network
  client stays open).
- Short group timeouts by default (session 6 s, heartbeat 1 s): a kafka-python group join on Tansu
  takes about half the session timeout (≈23 s with the 45 s default, ≈3 s with 6 s, measured), and
  a crashed member holds its partitions until the session times out.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterable, Mapping
from typing import TypeVar

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka import TopicPartition as KafkaTP
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError
from kafka.structs import OffsetAndMetadata
from pydantic import BaseModel, ConfigDict, Field

from events.bus import (
    EventConsumer,
    EventProducer,
    Headers,
    PublishError,
    Record,
    TopicPartition,
    _key_bytes,
    _norm_headers,
)

log = logging.getLogger(__name__)


def _close_what_kafka_python_leaves() -> None:
    """Two patches of kafka-python 3.0.12's network layer, applied once on import; each leaves a
    socket open for the garbage collector (``tests/events/test_kafka_clients.py`` has a test for
    each, the first also run on kafka-python's own code as a control):

    - a connect that fails (refused, timed out) or is cancelled (its client closed mid-connect,
      when the kernel may already have connected it) keeps its socket: ``sock_connect`` now
      closes it;
    - a connection closed while a write is still queued leaves its socket to the writer, which
      closes it once the queue drains; when the client's IO loop stops first (the client is
      closing) that never happens: the loop's ``close`` now closes every socket still registered
      with it once its own shutdown is done."""
    from kafka.net.inet import KafkaNetSocket
    from kafka.net.selector import NetworkSelector

    connect = KafkaNetSocket.sock_connect
    if getattr(connect, "closes_on_failure", False):
        return

    async def sock_connect(self, net, sock, sockaddr, timeout_at=None):
        try:
            return await connect(self, net, sock, sockaddr, timeout_at=timeout_at)
        except BaseException:  # incl. GeneratorExit: the connect's task was cancelled
            sock.close()
            raise

    sock_connect.closes_on_failure = True  # type: ignore[attr-defined]
    sock_connect.unpatched = connect  # type: ignore[attr-defined]
    KafkaNetSocket.sock_connect = sock_connect

    close = NetworkSelector.close

    def close_registered_sockets(self) -> None:
        if self._closed:
            return
        if self._io_thread is not None:
            self.stop()  # joins the IO thread: the registrations below are final
        registered = [key.fileobj for key in self._selector.get_map().values()]
        close(self)
        for sock in registered:
            if isinstance(sock, socket.socket) and sock.fileno() != -1:
                sock.close()

    close_registered_sockets.unpatched = close  # type: ignore[attr-defined]
    NetworkSelector.close = close_registered_sockets


_close_what_kafka_python_leaves()

C = TypeVar("C", KafkaAdminClient, KafkaConsumer, KafkaProducer)


def open_client(cls: type[C], **config: object) -> C:
    """``cls(**config)``, closing what a failed constructor leaves behind.

    kafka-python's clients start their network client (an IO thread, a wake-up socket pair, a
    connection to the bootstrap broker) before they bootstrap; when the bootstrap raises, nothing
    closes it, and its sockets are only reclaimed whenever the garbage collector gets to them. The
    constructors take the network client's factory (``kafka_client``), so this wraps it to keep a
    handle on what was built and closes that when the constructor raises."""
    return _open(cls, config)[0]


def _open(cls: type[C], config: dict[str, object]) -> tuple[C, list]:
    """``open_client``, also returning the network clients built for it (to close them when the
    client's own ``close`` stops half-way)."""
    config = dict(config)
    base = config.pop("kafka_client", None) or cls.DEFAULT_CONFIG["kafka_client"]
    built: list = []

    def factory(**kw: object):
        client = base(**kw)
        built.append(client)
        return client

    try:
        return cls(kafka_client=factory, **config), built
    except BaseException:
        _close_network(built, cls.__name__)
        raise


def _close_network(built: list, owner: str) -> None:
    for client in built:
        try:
            client.close()  # idempotent
        except Exception:  # noqa: BLE001 - best effort: the caller's own error is the one that matters
            log.debug("closing %s's network client failed", owner, exc_info=True)


class KafkaSettings(BaseModel):
    """The Kafka connection (env ``TONGKUAN_KAFKA__*``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bootstrap_servers: str = Field(default="127.0.0.1:9092", description="comma-separated host:port list")
    client_id: str = Field(default="tongkuan", description="client id prefix (-producer, -consumer, -admin)")
    # Producer
    enable_idempotence: bool = Field(default=True, description="idempotent producer (no broker-side duplicates)")
    linger_ms: int = Field(default=5, ge=0, description="producer batching delay")
    delivery_timeout_ms: int = Field(default=30_000, gt=0, description="give up on a record after this long")
    request_timeout_ms: int = Field(default=10_000, gt=0, description="one broker request's timeout")
    max_request_size: int = Field(default=1024 * 1024, gt=0, description="largest record batch the producer sends")
    # Consumer: short group timeouts (see the module doc).
    session_timeout_ms: int = Field(default=6_000, gt=0, description="group session timeout")
    heartbeat_interval_ms: int = Field(default=1_000, gt=0, description="group heartbeat interval")
    # Upper bound between two polls; the dispatcher keeps polling (paused) while it waits on tasks.
    max_poll_interval_ms: int = Field(default=300_000, gt=0, description="longest gap between two polls")
    auto_offset_reset: str = Field(default="earliest", pattern="^(earliest|latest)$",
                                   description="where a group without a committed offset starts")
    # How long the broker may hold a fetch that finds too little. 500 (Kafka's default) halved an
    # idle consumer's CPU against Tansu (44 -> 21 ms a second), but under a steady stream Tansu
    # holds fetches longer: publish -> poll at 70 records/s went from p50 28 / p90 49 ms to 130 /
    # 230 ms, and make bench-ingest's latency at half rate from p50 0.15 to 0.41 s.
    fetch_max_wait_ms: int = Field(default=100, ge=0, description="how long the broker may hold an empty fetch")

    @property
    def servers(self) -> list[str]:
        return [s.strip() for s in self.bootstrap_servers.split(",") if s.strip()]


def _tp(tp: TopicPartition) -> KafkaTP:
    return KafkaTP(tp.topic, tp.partition)


class KafkaEventProducer(EventProducer):
    def __init__(self, settings: KafkaSettings, **overrides: object) -> None:
        s = settings
        config: dict[str, object] = dict(
            bootstrap_servers=s.servers,
            client_id=f"{s.client_id}-producer",
            acks="all",
            enable_idempotence=s.enable_idempotence,
            linger_ms=s.linger_ms,
            delivery_timeout_ms=s.delivery_timeout_ms,
            request_timeout_ms=s.request_timeout_ms,
            max_request_size=s.max_request_size,
            # kafka-python's default (5) keeps order with idempotence on; without it, 1.
            max_in_flight_requests_per_connection=5 if s.enable_idempotence else 1,
        )
        config.update(overrides)
        self._producer = open_client(KafkaProducer, **config)
        self._futures: list = []
        self._closed = False

    def publish(
        self, topic: str, key: str | bytes | None, value: bytes, headers: Headers | None = None
    ) -> None:
        try:
            fut = self._producer.send(
                topic, key=_key_bytes(key), value=value, headers=list(_norm_headers(headers))
            )
        except KafkaError as e:
            raise PublishError(f"{type(e).__name__}: {e}") from e
        self._futures.append(fut)

    def flush(self, timeout: float | None = None) -> None:
        futures, self._futures = self._futures, []
        try:
            self._producer.flush(timeout=timeout)
        except KafkaError as e:
            raise PublishError(f"flush: {type(e).__name__}: {e}") from e
        errors = [f.exception for f in futures if not f.is_done or f.failed()]
        if errors:
            first = errors[0]
            raise PublishError(f"{len(errors)} of {len(futures)} records not acknowledged: {first!r}")

    def close(self, timeout: float = 5.0) -> None:
        """Wait up to ``timeout`` for what is pending, then stop. Records still unacknowledged then
        are dropped: their ``flush`` did not succeed, so no caller claimed them. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self._producer.flush(timeout=timeout)
        except KafkaError:
            pass
        try:
            self._producer.close(timeout=timeout)
        except KafkaError as e:
            # kafka-python 3.0.12's close() flushes again and raises before it stops its IO thread
            # (which would then run, holding its sockets, until the process exits).
            log.warning("producer close: %s: %s; stopping it without the unacknowledged records",
                        type(e).__name__, e)
            sender = self._producer._sender
            sender.force_close()
            sender.join(timeout)


class KafkaEventConsumer(EventConsumer):
    """A group member subscribed to ``topics`` (or, with ``assign=True``, owning all their partitions
    without a group join: faster, no rebalancing, still committing to ``group_id``)."""

    def __init__(
        self,
        topics: Iterable[str],
        group_id: str,
        settings: KafkaSettings,
        assign: bool = False,
        **overrides: object,
    ) -> None:
        s = settings
        config: dict[str, object] = dict(
            bootstrap_servers=s.servers,
            client_id=f"{s.client_id}-consumer",
            group_id=group_id,
            enable_auto_commit=False,
            auto_offset_reset=s.auto_offset_reset,
            session_timeout_ms=s.session_timeout_ms,
            heartbeat_interval_ms=s.heartbeat_interval_ms,
            max_poll_interval_ms=s.max_poll_interval_ms,
            fetch_max_wait_ms=s.fetch_max_wait_ms,
            # kafka-python requires it above both (a fetch may be held fetch_max_wait_ms)
            request_timeout_ms=max(s.request_timeout_ms, s.session_timeout_ms + 1000, s.fetch_max_wait_ms + 1000),
        )
        config.update(overrides)
        self._consumer, self._network = _open(KafkaConsumer, config)
        self.topics = list(topics)
        try:
            if assign:
                tps = []
                for t in self.topics:
                    parts = self._consumer.partitions_for_topic(t) or set()
                    tps += [KafkaTP(t, p) for p in sorted(parts)]
                if not tps:
                    raise ValueError(f"no partitions known for {self.topics}")
                self._consumer.assign(tps)
            else:
                self._consumer.subscribe(self.topics)
        except BaseException:
            self.close()
            raise

    def poll(self, max_records: int, timeout: float) -> list[Record]:
        batches = self._consumer.poll(timeout_ms=int(timeout * 1000), max_records=max_records)
        out: list[Record] = []
        for ktp, recs in batches.items():
            for r in recs:
                out.append(
                    Record(
                        topic=ktp.topic,
                        partition=ktp.partition,
                        offset=r.offset,
                        key=r.key,
                        value=r.value,
                        headers=tuple((k, v or b"") for k, v in (r.headers or ())),
                        timestamp_ms=r.timestamp,
                    )
                )
        return out

    def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        if offsets:
            self._consumer.commit({_tp(tp): OffsetAndMetadata(off, "", -1) for tp, off in offsets.items()})

    def committed(self, tp: TopicPartition) -> int | None:
        return self._consumer.committed(_tp(tp))

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self._consumer.seek(_tp(tp), offset)

    def assignment(self) -> set[TopicPartition]:
        return {TopicPartition(t.topic, t.partition) for t in self._consumer.assignment()}

    def highwater(self, tp: TopicPartition) -> int | None:
        return self._consumer.highwater(_tp(tp))

    def pause(self) -> None:
        self._consumer.pause(*self._consumer.assignment())

    def resume(self) -> None:
        self._consumer.resume(*self._consumer.paused())

    def close(self) -> None:
        """Leave the group (without committing). A broker that is gone cannot stop the close: the
        network client is closed even when kafka-python's own close stops at the group leave."""
        try:
            self._consumer.close(autocommit=False)
        except KafkaError as e:
            log.warning("consumer close: %s: %s", type(e).__name__, e)
        finally:
            _close_network(self._network, "KafkaConsumer")


def create_topics(settings: KafkaSettings, topics: Mapping[str, int]) -> list[str]:
    """Create missing topics (name → partitions); returns the ones created. Idempotent."""
    admin = open_client(KafkaAdminClient, bootstrap_servers=settings.servers, client_id=f"{settings.client_id}-admin")
    try:
        existing = set(admin.list_topics())
        new = [NewTopic(t, n, 1) for t, n in topics.items() if t not in existing]
        if new:
            try:
                admin.create_topics(new)
            except TopicAlreadyExistsError:
                pass
        return [t.name for t in new]
    finally:
        admin.close()


def make_producer(settings: KafkaSettings) -> KafkaEventProducer:
    """The producer factory the hook, the dispatcher (DLQ) and the bench use."""
    return KafkaEventProducer(settings)


def make_consumer(
    topics: Iterable[str], group_id: str, settings: KafkaSettings, assign: bool = False
) -> KafkaEventConsumer:
    return KafkaEventConsumer(topics, group_id, settings, assign=assign)


__all__ = [
    "KafkaEventConsumer",
    "KafkaEventProducer",
    "KafkaSettings",
    "create_topics",
    "make_consumer",
    "make_producer",
    "open_client",
]
