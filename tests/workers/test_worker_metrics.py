"""Queue-depth collector against Redis on 127.0.0.1 (DB 13, emptied after) and against nothing."""

from __future__ import annotations

import socket

from prometheus_client import CollectorRegistry

from tests.workers.conftest import BROKER
from workers.metrics import QueueDepthCollector


def samples(collector) -> dict:
    reg = CollectorRegistry()
    reg.register(collector)
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for m in reg.collect() for s in m.samples}


def test_queue_depth_sums_priority_lists(redis_db):
    redis_db.rpush("q.test", *[b"m"] * 3)
    redis_db.rpush("q.test\x06\x163", b"m")
    c = QueueDepthCollector(BROKER, ["q.test", "q.empty"])
    got = samples(c)
    c.close()
    assert got[("tongkuan_celery_queue_depth", (("queue", "q.test"),))] == 4
    assert got[("tongkuan_celery_queue_depth", (("queue", "q.empty"),))] == 0
    assert got[("tongkuan_celery_broker_up", ())] == 1


def test_unreachable_broker_reports_down_without_failing_the_scrape():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    c = QueueDepthCollector(f"redis://127.0.0.1:{port}/0", ["q"], timeout_s=0.2)
    got = samples(c)
    c.close()
    assert got == {("tongkuan_celery_broker_up", ()): 0}
