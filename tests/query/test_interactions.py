"""The interaction log (query/interactions.py): every search records what it showed, and
``POST /v1/feedback`` records what the shopper did with it, on ``search.interactions``.

Bad input -> what it gets: feedback for an unknown (or expired) request 404 ``unknown_request``; for
an item the request did not show 422 ``not_shown``; an unknown kind, a negative or non-finite amount,
an amount on a click, unknown fields 422 ``invalid_request``; no interaction log 503
``interactions_off``; a sink that refuses 503 ``interactions_unavailable`` (nothing recorded) — while
a search whose impression cannot be recorded is still answered (counted as dropped).
"""

from __future__ import annotations

import json
import time
import uuid

import pytest
from fastapi.testclient import TestClient

from events.bus import InMemoryBus
from events.hook import HookSettings
from feature_store.inputs import INTERACTIONS_TOPIC
from query.access import add_key
from query.interactions import (
    BusSink,
    FileSink,
    Interactions,
    InteractionSettings,
    MemoryLedger,
    RedisLedger,
    read_log,
)
from query.models import ObjectResult, SearchHit, SearchResponse
from tests.conftest import redis_client
from tongkuan.api import create_app
from tongkuan.config import ApiConfig, ApiSettings

DB = 13  # a dedicated Redis DB; only keys this module created are deleted


class ShelfSearcher:
    """Answers every search with the same three items (the API's part is under test, not search)."""

    max_image_bytes = 100_000
    serves_text = False

    def search_bytes(self, data: bytes, *, limit: int, max_objects: int, filters=None, text=None,
                     explain=False) -> SearchResponse:
        hits = [SearchHit(item_id=i, score=s) for i, s in (("mug-red", 0.9), ("mug-blue", 0.8), ("cup", 0.5))]
        obj = ObjectResult(box=(0, 0, 8, 8), region_score=1.0, category=None, hits=hits[:limit])
        return SearchResponse(model_id="m@1", objects=[obj], timings_ms={})


class RefusingSink(FileSink):
    def write(self, event) -> None:
        raise OSError("disk full")


@pytest.fixture(params=["memory", "redis"])
def ledger(request):
    if request.param == "memory":
        yield MemoryLedger(ttl_s=60)
        return
    r = redis_client(DB)
    before = set(r.keys("*"))
    yield RedisLedger(r, ttl_s=60)
    created = set(r.keys("*")) - before
    if created:
        r.delete(*created)
    r.close()


def app_with(interactions, tmp_path, **settings) -> TestClient:
    """``interactions`` None: the ones ``settings`` (``InteractionSettings``) configure."""
    keys = tmp_path / f"keys-{uuid.uuid4().hex[:8]}.json"
    key = add_key(keys, "test", ["search"])
    app = create_app(searcher=ShelfSearcher(), producer=InMemoryBus().producer(), interactions=interactions,
                     config=ApiConfig(hook=HookSettings(secret="x" * 40), api=ApiSettings(keys_file=keys),
                                      interactions=InteractionSettings(**settings)))
    return TestClient(app, headers={"X-API-Key": key})


def test_a_search_is_an_impression_and_feedback_is_recorded_against_it(tmp_path, ledger):
    log = tmp_path / "events.jsonl"
    with app_with(Interactions(FileSink(log), ledger), tmp_path) as c:
        r = c.post("/v1/search", content=b"jpeg bytes", headers={"content-type": "image/jpeg"})
        assert r.status_code == 200
        rid = r.json()["request_id"]
        assert r.headers["X-Request-ID"] == rid
        click = c.post("/v1/feedback", json={"request_id": rid, "item_id": "mug-blue", "kind": "click",
                                             "event_id": "e-1"})
        order = c.post("/v1/feedback", json={"request_id": rid, "item_id": "mug-blue", "kind": "order",
                                             "amount": 12.5})
        assert click.status_code == 202 and click.json() == {"event_id": "e-1", "request_id": rid, "kind": "click"}
        assert order.status_code == 202
    shown, clicked, ordered = read_log(log)
    assert shown["kind"] == "impression" and shown["request_id"] == rid
    assert shown["item_ids"] == ["mug-red", "mug-blue", "cup"] and shown["positions"] == [0, 1, 2]
    assert shown["scores"] == [0.9, 0.8, 0.5] and shown["model_version"] == "m@1" and shown["ranker_version"] == "visual"
    assert shown["query_id"] and abs(shown["event_time"] - time.time()) < 60
    assert (clicked["kind"], clicked["item_id"], clicked["event_id"]) == ("click", "mug-blue", "e-1")
    assert (ordered["kind"], ordered["amount"]) == ("order", 12.5)
    # the same picture is the same query
    with app_with(Interactions(FileSink(log), ledger), tmp_path) as c:
        c.post("/v1/search", content=b"jpeg bytes", headers={"content-type": "image/jpeg"})
    assert read_log(log)[-1]["query_id"] == shown["query_id"]


@pytest.mark.parametrize(("body", "status", "reason"), [
    ({"request_id": "never-asked", "item_id": "cup", "kind": "click"}, 404, "unknown_request"),
    ({"item_id": "not-shown", "kind": "click"}, 422, "not_shown"),
    ({"item_id": "cup", "kind": "like"}, 422, "invalid_request"),
    ({"item_id": "cup", "kind": "order", "amount": -1}, 422, "invalid_request"),
    ({"item_id": "cup", "kind": "click", "amount": 3}, 422, "invalid_request"),
    ({"item_id": "cup", "kind": "click", "colour": "red"}, 422, "invalid_request"),
])
def test_bad_feedback_is_refused_with_its_reason_and_records_nothing(tmp_path, ledger, body, status, reason):
    log = tmp_path / "events.jsonl"
    with app_with(Interactions(FileSink(log), ledger), tmp_path) as c:
        rid = c.post("/v1/search", content=b"x", headers={"content-type": "image/jpeg"}).json()["request_id"]
        r = c.post("/v1/feedback", json={"request_id": rid, **body})
        assert r.status_code == status, r.text
        assert r.json()["reason"] == reason
        # a non-finite amount cannot even be sent as JSON; the model refuses it too
        assert c.post("/v1/feedback", content=b'{"request_id": "%s", "item_id": "cup", "kind": "order", '
                      b'"amount": NaN}' % rid.encode(), headers={"content-type": "application/json"}).status_code == 422
    assert [e["kind"] for e in read_log(log)] == ["impression"]


def test_an_expired_request_takes_no_feedback():
    ledger = MemoryLedger(ttl_s=0.05)
    ledger.remember("r1", ["a"])
    assert ledger.shown("r1") == ["a"]
    time.sleep(0.1)
    assert ledger.shown("r1") is None
    small = MemoryLedger(max_requests=2)
    for rid in ("r1", "r2", "r3"):
        small.remember(rid, ["a"])
    assert small.shown("r1") is None and small.shown("r3") == ["a"]


def test_without_a_log_feedback_is_503_and_a_refusing_sink_never_fails_the_search(tmp_path):
    with app_with(None, tmp_path, sink="off") as c:
        assert c.post("/v1/search", content=b"x", headers={"content-type": "image/jpeg"}).status_code == 200
        r = c.post("/v1/feedback", json={"request_id": "r", "item_id": "cup", "kind": "click"})
        assert r.status_code == 503 and r.json()["reason"] == "interactions_off"
    with app_with(None, tmp_path, path=tmp_path / "configured.jsonl") as c:  # the embedded default: a file
        c.post("/v1/search", content=b"x", headers={"content-type": "image/jpeg"})
    assert [e["kind"] for e in read_log(tmp_path / "configured.jsonl")] == ["impression"]
    with app_with(Interactions(RefusingSink(tmp_path / "x.jsonl"), MemoryLedger()), tmp_path) as c:
        r = c.post("/v1/search", content=b"x", headers={"content-type": "image/jpeg"})
        assert r.status_code == 200  # the impression was dropped (counted), the search answered
        rid = r.json()["request_id"]
        r = c.post("/v1/feedback", json={"request_id": rid, "item_id": "cup", "kind": "click"})
        assert r.status_code == 503 and r.json()["reason"] == "interactions_unavailable"


def test_the_bus_sink_publishes_on_search_interactions_keyed_by_request():
    bus = InMemoryBus()
    interactions = Interactions(BusSink(bus.producer(), flush_s=0.05), MemoryLedger())
    hits = [SearchHit(item_id="a", score=0.7), SearchHit(item_id="b", score=0.6)]
    resp = SearchResponse(request_id=uuid.uuid4().hex, model_id="m", timings_ms={},
                          objects=[ObjectResult(box=None, region_score=1, category=None, hits=hits)])
    interactions.shown(resp, "q1")
    interactions.engaged(resp.request_id, "b", "add_to_cart")
    interactions.close()
    consumer = bus.consumer([INTERACTIONS_TOPIC], "t")
    records = consumer.poll(max_records=10, timeout=0.1)
    assert [json.loads(rec.value)["kind"] for rec in records] == ["impression", "add_to_cart"]
    assert {rec.key for rec in records} == {resp.request_id.encode()}
