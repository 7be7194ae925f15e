"""Dispatcher: coalescing, dead letters, feature events forwarded, commit only after the batch's
tasks succeeded.

Runs over both buses (in-memory and Tansu) with a fake task sender; one test uses real Celery+Redis.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import pytest

from events.bus import TopicPartition
from events.contract import decode_task
from events.deadletter import read
from events.models import ItemDeleted, ItemFeaturesUpdated, ItemUpserted, event_to_bytes
from tests.conftest import redis_client
from tests.events.conftest import Bus, unique
from workers.batches import BatchResult
from workers.celery_app import APPLY_EVENTS_TASK
from workers.dispatcher import Dispatcher
from workers.settings import DispatcherSettings
from workers.task_queue import CelerySender


def up(item: str, v: int) -> ItemUpserted:
    return ItemUpserted(item_id=item, version=v, title="t", category_path=("c",), images=("x.jpg",))


class Handle:
    def __init__(self, result: Any = None, exc: Exception | None = None, ready: bool = True) -> None:
        self.result, self.exc, self._ready = result, exc, ready

    def ready(self) -> bool:
        return self._ready

    def get(self, timeout: float) -> dict:
        if self.exc:
            raise self.exc
        return self.result or {"indexed": [], "deleted": [], "stale": [], "dead_lettered": []}


class FakeSender:
    """Fails the first ``fail`` sends (task error), or never finishes them with ``hang``."""

    def __init__(self, fail: int = 0, hang: int = 0, result: dict | None = None) -> None:
        self.calls: list[list[dict]] = []
        self.fail, self.hang, self.result = fail, hang, result

    def send(self, events: list[dict]) -> Handle:
        self.calls.append(events)
        n = len(self.calls)
        if n <= self.hang:
            return Handle(ready=False)
        if n <= self.hang + self.fail:
            return Handle(exc=RuntimeError("worker lost"))
        return Handle(self.result)


def settings(topic: str, dlq: str, features: str = "unused-features", **kw: Any) -> DispatcherSettings:
    base = dict(topic=topic, dlq_topic=dlq, features_topic=features, max_batch=64, max_wait_ms=300,
                retry_backoff_s=0.05, metrics_port=0)
    return DispatcherSettings(**{**base, **kw})


def make(bus: Bus, sender: FakeSender, partitions: int = 1, group: str | None = None, **kw: Any):
    topic, dlq = bus.new_topic(partitions), bus.new_topic(1)
    group = group or unique("g")
    consumer = bus.consumer([topic], group)
    return topic, dlq, group, Dispatcher(consumer, sender, bus.producer(), settings(topic, dlq, **kw))


def ids(call: list[dict]) -> list[str]:
    return [e["event"]["item_id"] for e in call]


def publish(bus: Bus, topic: str, values: list[tuple[str, bytes]]) -> None:
    with bus.producer() as p:
        for key, value in values:
            p.publish(topic, key, value)
        p.flush(10)


def dlq_letters(bus: Bus, dlq: str, n: int, timeout: float = 10, *, then: float = 0.0) -> list:
    """The first ``n`` dead letters (waiting up to ``timeout``); with ``then`` > 0, also any that
    arrive in the following ``then`` seconds (to show there is no extra one: a group join under
    load can take longer than ``then`` alone, so the wait for the expected letters comes first)."""
    from tests.events.conftest import drain

    with bus.consumer([dlq], unique("dlq")) as c:
        got = drain(c, n, timeout=timeout)
        if then > 0:
            got += drain(c, 1, timeout=then)
        return [read(r) for r in got]


def dlq_reasons(bus: Bus, dlq: str, n: int, timeout: float = 10, *, then: float = 0.0) -> list[str]:
    return sorted(d.reason for d in dlq_letters(bus, dlq, n, timeout, then=then))


POISON = [
    ("p1", b"{not json"),
    ("p2", json.dumps({**up("p2", 1).model_dump(mode="json"), "schema_version": 2}).encode()),
    ("p3", json.dumps({"type": "item_upserted", "item_id": "p3", "version": 1}).encode()),
]


def test_coalesces_dead_letters_forwards_features_and_commits(bus: Bus) -> None:
    sender = FakeSender()
    topic, dlq, group, d = make(bus, sender, features=bus.new_topic(1))
    features_topic = d.settings.features_topic
    feats = [
        ItemFeaturesUpdated(item_id="c", event_time=t, counters={"clicks": int(t)}) for t in (20.0, 10.0)
    ]
    events = [up("a", 1), up("a", 3), ItemDeleted(item_id="b", version=5), up("b", 4), up("a", 2), *feats]
    publish(bus, topic, [(e.item_id, event_to_bytes(e)) for e in events] + POISON)
    with d.consumer:
        d.run(max_batches=1, idle_timeout=15)
        assert d.consumer.committed(TopicPartition(topic, 0)) == len(events) + len(POISON)
    (call,) = sender.calls
    sent, rejected = decode_task(call)  # the task's own decoding of what the dispatcher sent
    assert rejected == []
    assert [(s.event.type, s.event.item_id, s.event.version) for s in sent] == [
        ("item_upserted", "a", 3),
        ("item_deleted", "b", 5),
    ]
    # each event keeps its original record, for its dead letter should it fail in the task
    assert sent[0].raw == event_to_bytes(events[1]) and sent[0].source.topic == topic
    # feature events never reach the embedding task: both are forwarded to their own topic, as they were
    from tests.events.conftest import drain

    with bus.consumer([features_topic], unique("f")) as c:
        assert sorted(r.value for r in drain(c, 2)) == sorted(event_to_bytes(f) for f in feats)
    letters = dlq_letters(bus, dlq, 3)
    assert sorted(d.reason for d in letters) == ["invalid_event", "malformed_json", "unknown_schema_version"]
    for letter in letters:  # one envelope: the original bytes, where they came from, by whom
        original = dict(POISON)[letter.key]
        assert letter.original_bytes() == original and letter.stage == "dispatcher"
        assert letter.source_topic == topic and letter.source_offset is not None and letter.detail


def test_failed_task_is_retried_not_skipped_and_dlq_not_duplicated(bus: Bus) -> None:
    sender = FakeSender(fail=2)
    topic, dlq, group, d = make(bus, sender)
    publish(bus, topic, [("a", event_to_bytes(up("a", 1))), ("b", event_to_bytes(up("b", 1))), POISON[0]])
    tp = TopicPartition(topic, 0)
    with d.consumer:
        results = []
        while not (results and results[-1].ok):
            r = d.step()
            if r is not None:
                results.append(r)
                if not r.ok:
                    assert d.consumer.committed(tp) is None  # nothing committed after a failure
        assert [r.ok for r in results] == [False, False, True]
        assert d.consumer.committed(tp) == 3
    assert len(sender.calls) == 3 and sender.calls[0] == sender.calls[2]
    # once, although the batch ran 3 times: the one letter, then 2.5 s without a second
    assert dlq_reasons(bus, dlq, 1, then=2.5) == ["malformed_json"]


class PoisonSender(FakeSender):
    """A task that raises (any exception type) whenever its events include a poison item; with
    ``hang_alone``, a task of a lone poison event never answers instead."""

    def __init__(self, poison: set[str], exc: Exception, hang_alone: bool = False) -> None:
        super().__init__()
        self.poison, self.exc, self.hang_alone = poison, exc, hang_alone

    def send(self, events: list[dict]) -> Handle:
        self.calls.append(events)
        if self.poison & set(ids(events)):
            return Handle(ready=False) if self.hang_alone and len(events) == 1 else Handle(exc=self.exc)
        return Handle({"indexed": ids(events), "deleted": [], "stale": [], "dead_lettered": []})


@pytest.mark.parametrize("exc", [RuntimeError("boom"), TypeError("'str' object cannot be interpreted"),
                                 KeyError("x"), RecursionError("deep")], ids=lambda e: type(e).__name__)
def test_a_poison_event_fails_alone_after_the_batch_attempts_and_the_partition_moves_on(bus: Bus, exc) -> None:
    """The finding: a task that raised on one event made the batch rewind and resend for ever (0
    commits), so the good events of that batch and of later ones were never indexed."""
    attempts = 3
    sender = PoisonSender({"x"}, exc)
    topic, dlq, group, d = make(bus, sender, max_batch_attempts=attempts)
    good = [f"g{i}" for i in range(12)]
    values = [(i, event_to_bytes(up(i, 1))) for i in good[:6]] + [("x", event_to_bytes(up("x", 1)))] + \
             [(i, event_to_bytes(up(i, 1))) for i in good[6:]]
    publish(bus, topic, values)
    with d.consumer:
        d.run(max_batches=1, idle_timeout=15)
        assert d.consumer.committed(TopicPartition(topic, 0)) == len(values)  # to the end
        publish(bus, topic, [("n", event_to_bytes(up("n", 1)))])
        d.run(max_batches=1, idle_timeout=15)  # and the next batch goes out whole again
    assert ids(sender.calls[-1]) == ["n"] and len(sender.calls) == attempts + len(values) + 1
    sender.calls.pop()
    whole = [c for c in sender.calls if len(c) > 1]
    alone = [c for c in sender.calls if len(c) == 1]
    assert len(whole) == attempts  # never more than the configured attempts
    assert all(set(ids(c)) == set(good) | {"x"} for c in whole)
    assert sorted(ids(c)[0] for c in alone) == sorted(good + ["x"])  # then one task per event
    letters = dlq_letters(bus, dlq, 1, then=2.5)  # the one letter, and no second
    assert [(x.item_id, x.reason, x.stage) for x in letters] == [("x", "processing_failed", "dispatcher")]
    assert type(exc).__name__ in letters[0].detail and letters[0].attempts == attempts + 1


def test_an_isolated_event_without_an_answer_is_retried_not_dead_lettered(bus: Bus) -> None:
    """No answer (no worker took the task, or it died without one) says nothing about the event:
    even isolated, it is resent, never dead-lettered; the worker's hard time limit turns a task that
    hangs into an error, which is an answer."""
    sender = PoisonSender({"x"}, RuntimeError("boom"), hang_alone=True)
    topic, dlq, group, d = make(bus, sender, max_batch_attempts=1, task_timeout_s=0.2)
    publish(bus, topic, [("a", event_to_bytes(up("a", 1))), ("x", event_to_bytes(up("x", 1)))])
    with d.consumer:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and sum(1 for c in sender.calls if ids(c) == ["x"]) < 3:
            d.step()
        assert d.consumer.committed(TopicPartition(topic, 0)) is None
    assert dlq_letters(bus, dlq, 1, timeout=1.5) == []


def test_no_commit_on_failure_means_redelivery_to_next_dispatcher(bus: Bus) -> None:
    failing = FakeSender(fail=100)
    topic, dlq, group, d = make(bus, failing)
    publish(bus, topic, [("a", event_to_bytes(up("a", 1)))])
    with d.consumer:
        while d.step() is None:
            pass
    assert failing.calls  # it tried, failed, committed nothing, and went away
    ok = FakeSender()
    d2 = Dispatcher(bus.consumer([topic], group), ok, bus.producer(), settings(topic, dlq))
    with d2.consumer:
        d2.run(max_batches=1, idle_timeout=15)
        assert d2.consumer.committed(TopicPartition(topic, 0)) == 1
    assert ok.calls == [failing.calls[0]]


def test_task_timeout_fails_the_batch_then_it_is_resent(bus: Bus) -> None:
    sender = FakeSender(hang=1)
    topic, dlq, group, d = make(bus, sender, task_timeout_s=0.3)
    publish(bus, topic, [("a", event_to_bytes(up("a", 1)))])
    with d.consumer:
        d.run(max_batches=1, idle_timeout=15)
        assert d.consumer.committed(TopicPartition(topic, 0)) == 1
    assert len(sender.calls) == 2


def test_task_dead_letters_count_as_done(bus: Bus) -> None:
    result = {
        "indexed": [],
        "deleted": [],
        "stale": [],
        "dead_lettered": [{"item_id": "a", "reason": "bad_image"}],
    }
    sender = FakeSender(result=result)
    topic, dlq, group, d = make(bus, sender)
    publish(bus, topic, [("a", event_to_bytes(up("a", 1)))])
    with d.consumer:
        d.run(max_batches=1, idle_timeout=15)
        assert d.consumer.committed(TopicPartition(topic, 0)) == 1


def test_shutdown_abandons_the_in_flight_batch_uncommitted() -> None:
    from events.bus import InMemoryBus

    mem = InMemoryBus()
    bus = Bus("memory", memory=mem)
    sender = FakeSender(hang=100)
    topic, dlq, group, d = make(bus, sender, shutdown_grace_s=0.2)
    publish(bus, topic, [("a", event_to_bytes(up("a", 1)))])
    threading.Timer(0.3, d.stop).start()
    t0 = time.monotonic()
    d.run(idle_timeout=10)
    assert time.monotonic() - t0 < 3
    assert d.consumer.committed(TopicPartition(topic, 0)) is None


def test_batches_are_bounded_by_size_and_split_into_task_chunks() -> None:
    from events.bus import InMemoryBus

    bus = Bus("memory", memory=InMemoryBus())
    sender = FakeSender()
    topic, dlq, group, d = make(bus, sender, max_batch=10, task_chunk=4)
    publish(bus, topic, [(f"i{i}", event_to_bytes(up(f"i{i}", 1))) for i in range(25)])
    d.run(max_batches=3, idle_timeout=5)
    # at most 4 a task, the tasks of one batch of near-equal size: 10 -> 3+3+4, 5 -> 2+3
    assert [len(c) for c in sender.calls] == [3, 3, 4, 3, 3, 4, 2, 3]
    assert [i for c in sender.calls for i in ids(c)] == [f"i{i}" for i in range(25)]
    assert d.consumer.committed(TopicPartition(topic, 0)) == 25


@pytest.mark.integration
def test_celery_sender_round_trip_with_redis() -> None:
    """The real Celery-backed sender: send_task by name, wait for the result, forget it."""
    from celery import Celery
    from celery.contrib.testing.worker import start_worker

    url = "redis://127.0.0.1:6379/11"  # a dedicated DB; only keys this test created are deleted
    r = redis_client(11)
    before = set(r.keys("*"))
    queue = unique("tongkuan-test")
    app = Celery("dispatcher-test", broker=url, backend=url)
    app.conf.update(task_default_queue=queue, broker_connection_retry_on_startup=False)

    # A name of its own: workers.tasks may already have registered the task as a shared task.
    task_name = unique(APPLY_EVENTS_TASK)

    @app.task(name=task_name)
    def apply(events: list[dict]) -> dict:
        return {
            "indexed": [e["event"]["item_id"] for e in events],
            "deleted": [],
            "stale": [],
            "dead_lettered": [],
        }

    try:
        with start_worker(app, pool="solo", perform_ping_check=False, queues=[queue], loglevel="WARNING"):
            handle = CelerySender(app, task_name=task_name).send([{"event": up("a", 1).model_dump(mode="json")}])
            deadline = time.monotonic() + 10
            while not handle.ready() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert handle.get(timeout=5)["indexed"] == ["a"]
    finally:
        created = set(r.keys("*")) - before
        if created:
            r.delete(*created)
        r.close()


class GatedSender:
    """Every task stays unfinished until ``release(n)`` finishes the n-th send."""

    def __init__(self) -> None:
        self.calls: list[list[dict]] = []
        self.handles: list[Handle] = []

    def send(self, events: list[dict]) -> Handle:
        self.calls.append(events)
        self.handles.append(Handle(ready=False))
        return self.handles[-1]

    def release(self, n: int) -> None:
        self.handles[n]._ready = True


def _steps(d: Dispatcher, n: int) -> list[BatchResult]:
    out = []
    for _ in range(n):
        r = d.step()
        if r is not None:
            out.append(r)
    return out


def test_pipeline_sends_the_next_batch_while_one_is_in_flight_and_commits_in_order() -> None:
    from events.bus import InMemoryBus

    bus = Bus("memory", memory=InMemoryBus())
    sender = GatedSender()
    topic, dlq, group, d = make(bus, sender, max_batch=2, max_wait_ms=0, max_in_flight=2)
    publish(bus, topic, [(i, event_to_bytes(up(i, 1))) for i in ("a", "b", "c", "d", "e", "f")])
    tp = TopicPartition(topic, 0)
    assert _steps(d, 6) == []
    assert [ids(c) for c in sender.calls] == [["a", "b"], ["c", "d"]]  # 2 in flight
    sender.release(1)  # the younger batch finishes first: nothing may be committed past the older one
    assert _steps(d, 4) == [] and d.consumer.committed(tp) is None
    sender.release(0)
    results = _steps(d, 3)
    assert [r.ok for r in results] == [True, True] and d.consumer.committed(tp) == 4
    assert [ids(c) for c in sender.calls][2] == ["e", "f"]


def test_pipeline_holds_a_batch_that_shares_an_item_with_one_in_flight() -> None:
    from events.bus import InMemoryBus

    bus = Bus("memory", memory=InMemoryBus())
    sender = GatedSender()
    topic, dlq, group, d = make(bus, sender, max_batch=2, max_wait_ms=0, max_in_flight=2)
    publish(bus, topic, [("a", event_to_bytes(up("a", 1))), ("b", event_to_bytes(up("b", 1))),
                         ("a", event_to_bytes(up("a", 2))), ("c", event_to_bytes(up("c", 1)))])
    _steps(d, 6)
    assert len(sender.calls) == 1  # [a2, c] waits: item a is in flight (one writer per item)
    sender.release(0)
    _steps(d, 3)
    assert [(e["event"]["item_id"], e["event"]["version"]) for e in sender.calls[1]] == [("a", 2), ("c", 1)]
    sender.release(1)
    _steps(d, 3)
    assert d.consumer.committed(TopicPartition(topic, 0)) == 4


def test_a_full_pipeline_waits_without_polling_the_consumer_on_every_tick() -> None:
    """While every in-flight slot is taken the dispatcher checks its tasks every tick but polls the
    (paused) consumer only every keepalive_poll_s: a poll costs CPU on the cores the embedding uses."""
    from events.bus import InMemoryBus

    bus = Bus("memory", memory=InMemoryBus())
    sender = GatedSender()
    topic, dlq, group, d = make(bus, sender, max_batch=2, max_wait_ms=0, max_in_flight=1, tick_s=0.01,
                                keepalive_poll_s=0.2)
    publish(bus, topic, [(i, event_to_bytes(up(i, 1))) for i in ("a", "b", "c", "d")])
    _steps(d, 2)
    assert len(sender.calls) == 1  # the pipeline is full
    polls = []
    real_poll = d.consumer.poll
    d.consumer.poll = lambda n, timeout: polls.append(timeout) or real_poll(n, timeout)
    t0 = time.monotonic()
    ticks = 0
    while time.monotonic() - t0 < 0.5:
        assert d.step() is None
        ticks += 1
    assert ticks >= 20  # it does tick (about every 10 ms)...
    assert 1 <= len(polls) <= 3 and all(t == 0 for t in polls)  # ...and polls every 0.2 s, paused
    sender.release(0)
    assert [r.ok for r in _steps(d, 3)] == [True]  # then goes on: commits, sends [c, d]
    assert [ids(c) for c in sender.calls] == [["a", "b"], ["c", "d"]]


def test_split_evenly() -> None:
    from workers.batches import split_evenly

    assert [len(c) for c in split_evenly(list(range(80)), 64)] == [40, 40]
    assert [len(c) for c in split_evenly(list(range(128)), 64)] == [64, 64]
    assert [len(c) for c in split_evenly(list(range(65)), 64)] == [32, 33]
    assert split_evenly(list(range(3)), 64) == [[0, 1, 2]]
    assert split_evenly([], 64) == []
    assert sum(split_evenly(list(range(1000)), 7), []) == list(range(1000))
