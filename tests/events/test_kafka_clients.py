"""What kafka-python 3.0.12 leaves open on its failure paths, and that ``events.kafka`` closes it.

An unclosed socket is reclaimed whenever the garbage collector gets to it, and under
``filterwarnings = error`` that lands as an "unraisable" ResourceWarning in whichever test is
running then (a CI run failed that way in a feature-store test). The classes (the first two with
a control run of kafka-python alone):
- a constructor whose bootstrap fails (a broker that accepts and never answers: still starting, or
  too loaded) keeps its network client: IO thread, wake-up socket pair, connection (``open_client``);
- a refused or cancelled connect keeps its socket (``sock_connect``, patched on import);
- a connection closed with a write still queued leaves its socket to a writer that never runs once
  the client's IO loop stops (the loop's ``close``, patched on import; a CI run failed on it);
- ``close()`` on a broker that is gone: the producer's IO thread runs on, the consumer's network
  client stays open (the wrappers' ``close``)."""

from __future__ import annotations

import gc
import logging
import socket
import threading
import time
import warnings
import weakref
from collections.abc import Iterator

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.errors import KafkaTimeoutError

from events.kafka import KafkaEventConsumer, open_client
from tests.events.conftest import unique

QUICK = dict(request_timeout_ms=600, bootstrap_timeout_ms=600)
EXTRA = {KafkaAdminClient: {}, KafkaConsumer: {"group_id": "g"}, KafkaProducer: {"max_block_ms": 600}}


@pytest.fixture
def mute_broker(caplog: pytest.LogCaptureFixture) -> Iterator[str]:
    """A loopback port that accepts connections and never answers a request. kafka-python's log
    records of the failed bootstrap are not captured: their arguments would keep the abandoned
    client reachable, hiding it from the collector this test asks."""
    caplog.set_level(logging.CRITICAL, logger="kafka")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    server.settimeout(0.1)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except TimeoutError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield f"127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    t.join(5)
    for s in accepted:
        s.close()
    server.close()


def io_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("kafka-io-") and t.is_alive()}


def left_behind(build) -> tuple[list[str], int]:
    """Build (expecting it to raise), then collect: the unclosed sockets the collector found and
    the kafka IO threads still running."""
    before = io_threads()
    with pytest.raises(KafkaTimeoutError):
        build()
    time.sleep(0.2)  # a stopping IO thread's last turn
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        gc.collect()
    unclosed = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    return unclosed, len(io_threads() - before)


@pytest.mark.parametrize("cls", [KafkaAdminClient, KafkaConsumer, KafkaProducer], ids=lambda c: c.__name__)
def test_a_failed_bootstrap_leaves_no_socket_or_thread(cls, mute_broker: str) -> None:
    config = dict(bootstrap_servers=[mute_broker], **QUICK, **EXTRA[cls])
    assert left_behind(lambda: open_client(cls, **config)) == ([], 0)


@pytest.mark.parametrize("cls", [KafkaAdminClient, KafkaConsumer, KafkaProducer], ids=lambda c: c.__name__)
def test_without_it_kafka_python_leaves_them_open(cls, mute_broker: str) -> None:
    """The control: the bare constructor leaks (if a kafka-python upgrade makes this fail, it closes
    its own half-built clients and ``open_client`` can go)."""
    built: list[weakref.ref] = []  # weak: the collector must be free to find an abandoned client
    base = cls.DEFAULT_CONFIG["kafka_client"]

    def watch(**kw):
        client = base(**kw)
        built.append(weakref.ref(client))
        return client

    config = dict(bootstrap_servers=[mute_broker], kafka_client=watch, **QUICK, **EXTRA[cls])
    unclosed, threads = left_behind(lambda: cls(**config))
    try:
        assert unclosed or threads, "the bare constructor closed its network client"
    finally:
        for ref in built:  # a running IO thread keeps its client alive: close it here
            if (client := ref()) is not None:
                client.close()


def test_open_client_passes_a_callers_client_factory_through(mute_broker: str) -> None:
    made = []
    base = KafkaAdminClient.DEFAULT_CONFIG["kafka_client"]

    def factory(**kw):
        made.append(base(**kw))
        return made[-1]

    assert left_behind(lambda: open_client(KafkaAdminClient, bootstrap_servers=[mute_broker],
                                           kafka_client=factory, **QUICK)) == ([], 0)
    assert len(made) == 1


@pytest.mark.integration
def test_an_assigned_consumer_without_partitions_closes_before_it_raises(kafka_settings) -> None:
    before = io_threads()
    with pytest.raises(ValueError, match="no partitions known"):
        KafkaEventConsumer([unique("missing")], unique("g"), kafka_settings, assign=True,
                           allow_auto_create_topics=False)
    time.sleep(0.2)
    assert io_threads() - before == set()


@pytest.fixture
def vanishing_broker(tmp_path) -> Iterator:
    """A broker of this test's own, for stopping under a connected client."""
    from infra.tansu import TansuBroker

    broker = TansuBroker(log_path=tmp_path / "tansu.log", topics={"t": 1}).start()
    try:
        yield broker
    finally:
        broker.stop()


def kafka_threads() -> set[threading.Thread]:
    from kafka.producer.sender import Sender

    return {t for t in threading.enumerate() if t.is_alive() and (isinstance(t, Sender) or t in io_threads())}


@pytest.mark.integration
def test_a_producer_closes_when_the_broker_left_with_its_records(vanishing_broker, caplog) -> None:
    from events.kafka import KafkaEventProducer

    before = kafka_threads()
    producer = KafkaEventProducer(vanishing_broker.kafka_settings(request_timeout_ms=1000))
    producer.publish("t", "k", b"acknowledged")
    producer.flush(10)
    vanishing_broker.stop()
    producer.publish("t", "k", b"never acknowledged")  # the topic's metadata is known: queued
    t0 = time.monotonic()
    producer.close(timeout=0.5)
    assert time.monotonic() - t0 < 5
    assert kafka_threads() - before == set()
    assert "stopping it without the unacknowledged records" in caplog.text
    producer.close()  # a second close is a no-op


@pytest.mark.integration
def test_a_consumer_closes_when_the_broker_left(vanishing_broker) -> None:
    from tests.conftest import TEST_KAFKA

    before = kafka_threads()
    consumer = KafkaEventConsumer(["t"], unique("g"), vanishing_broker.kafka_settings(**TEST_KAFKA))
    deadline = time.monotonic() + 15
    while not consumer.assignment() and time.monotonic() < deadline:
        consumer.poll(10, timeout=0.2)  # joined: a close has a group to leave
    assert consumer.assignment()
    vanishing_broker.stop()
    consumer.close()
    assert kafka_threads() - before == set()
    consumer.close()


class Suspend:
    """An awaitable that never completes: the connect waits on it until its task is cancelled."""

    def __await__(self):
        yield
        raise AssertionError("resumed")


class Net:
    def wait_write(self, sock, timeout_at=None) -> Suspend:
        return Suspend()


@pytest.mark.parametrize("patched", [True, False], ids=["patched", "kafka-python"])
def test_a_cancelled_connect_closes_its_socket(patched: bool) -> None:
    import errno

    from kafka.net.inet import KafkaNetSocket

    connect = KafkaNetSocket.sock_connect if patched else KafkaNetSocket.sock_connect.unpatched
    factory = KafkaNetSocket()
    factory.connect_ex = lambda sock, addr: errno.EINPROGRESS  # the connect is under way
    sock = socket.socket()
    try:
        coro = connect(factory, Net(), sock, ("127.0.0.1", 9))
        coro.send(None)  # suspended in the wait for the connect to finish
        coro.close()  # the client closed: its IO loop cancels the task
        assert (sock.fileno() == -1) is patched
    finally:
        sock.close()


def test_a_refused_connect_closes_its_socket(caplog) -> None:
    """Nothing listens on the port: every bootstrap attempt is refused, none leaves a socket."""
    caplog.set_level(logging.CRITICAL, logger="kafka")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    config = dict(bootstrap_servers=[f"127.0.0.1:{port}"], **QUICK, **EXTRA[KafkaProducer])
    assert left_behind(lambda: open_client(KafkaProducer, **config)) == ([], 0)


@pytest.mark.integration
def test_a_connection_closed_with_a_write_queued_closes_its_socket(vanishing_broker) -> None:
    """The race a loaded machine runs into: the group leave (or any request) is still queued on a
    connection when the consumer closes. kafka-python leaves such a socket to its writer, which
    would close it once the queue drains, but the IO loop stops first."""
    from tests.conftest import TEST_KAFKA

    consumer = KafkaEventConsumer(["t"], unique("g"), vanishing_broker.kafka_settings(**TEST_KAFKA))
    deadline = time.monotonic() + 15
    while not consumer.assignment() and time.monotonic() < deadline:
        consumer.poll(10, timeout=0.2)
    conns = list(consumer._consumer._client._manager._conns.values())
    assert len(conns) >= 2  # the partition leader's and the group coordinator's
    socks = [c.transport._sock for c in conns]
    for c in conns:  # a write that no writer is scheduled to send: the race, made certain
        c.transport._write_buffer.append(memoryview(b"\0"))
    consumer.close()
    assert [s.fileno() for s in socks] == [-1] * len(socks)
