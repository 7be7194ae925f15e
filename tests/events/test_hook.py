"""POST /v1/hooks/catalog: signature, replay window, size cap, per-event validation, publish."""

from __future__ import annotations

import json
import time
import warnings

import pytest
from fastapi import FastAPI
from pydantic import ValidationError

from events.bus import EventProducer, InMemoryBus, LazyProducer, PublishError
from events.contract import parse_record
from events.hook import HookSettings, router, secret_problem, sign, signed_headers, verify_signature
from events.topics import CATALOG_FEATURES, CATALOG_ITEMS
from tests.events.conftest import drain, unique

with warnings.catch_warnings():
    # starlette 1.x asks for ``httpx2`` (not installed here); the httpx path still works.
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

SECRET = "s" * 40


def _settings(**kw) -> HookSettings:
    return HookSettings(secret=SECRET, **kw)


def create_app(producer: EventProducer, settings: HookSettings) -> FastAPI:
    """The hook router mounted as any app mounts it (``tongkuan.api`` does the same)."""
    app = FastAPI()
    app.state.event_producer = producer
    app.state.hook_settings = settings
    app.include_router(router)
    return app


def upsert(item_id: str, version: int = 1, **kw) -> dict:
    return {
        "type": "item_upserted",
        "item_id": item_id,
        "version": version,
        "title": "red mug",
        "category_path": ["home", "mugs"],
        "images": [f"https://img.example/{item_id}.jpg"],
        **kw,
    }


@pytest.fixture
def mem() -> InMemoryBus:
    return InMemoryBus()


@pytest.fixture
def client(mem: InMemoryBus):
    with TestClient(create_app(producer=mem.producer(), settings=_settings(max_body_bytes=4096))) as c:
        yield c


def post(client: TestClient, payload, secret: str = SECRET, ts: int | None = None, raw: bytes | None = None):
    body = raw if raw is not None else json.dumps(payload).encode()
    return client.post("/v1/hooks/catalog", content=body, headers=signed_headers(secret, body, ts))


def test_accepts_one_event_and_publishes_it_keyed_by_item(client: TestClient, mem: InMemoryBus) -> None:
    r = post(client, upsert("a1", 3))
    assert r.status_code == 202, r.text
    assert r.json() == {"accepted": ["a1"], "rejected": []}
    (rec,) = mem.records(CATALOG_ITEMS)
    assert rec.key == b"a1" and rec.header("type") == b"item_upserted"
    assert parse_record(rec.value).version == 3


def test_batch_with_some_invalid_is_202_with_reasons(client: TestClient, mem: InMemoryBus) -> None:
    batch = [
        upsert("a1"),
        upsert("a2", schema_version=2),
        {"type": "item_deleted", "item_id": "a3", "version": 4},
        "not an object",
        upsert("a4", version=-1),
    ]
    r = post(client, batch)
    assert r.status_code == 202
    body = r.json()
    assert body["accepted"] == ["a1", "a3"]
    reasons = {x["index"]: x for x in body["rejected"]}
    assert set(reasons) == {1, 3, 4}
    assert reasons[1]["reason"] == "unknown_schema_version" and reasons[1]["item_id"] == "a2"
    assert "schema_version 2" in reasons[1]["detail"]
    assert reasons[3] == {"index": 3, "item_id": None, "reason": "invalid_event",
                          "detail": "expected a JSON object, got str"}
    assert reasons[4]["reason"] == "invalid_event" and reasons[4]["detail"].startswith("item_upserted.version")
    assert [r.key for r in mem.records(CATALOG_ITEMS)] == [b"a1", b"a3"] or len(
        mem.records(CATALOG_ITEMS)
    ) == 2


def test_nothing_valid_is_422(client: TestClient, mem: InMemoryBus) -> None:
    r = post(client, [upsert("a1", schema_version=9)])
    assert r.status_code == 422
    assert r.json()["accepted"] == [] and r.json()["rejected"][0]["index"] == 0
    assert mem.records(CATALOG_ITEMS) == []


@pytest.mark.parametrize(
    "case",
    ["missing", "wrong_secret", "tampered", "old", "future", "malformed_ts", "no_prefix"],
)
def test_bad_signatures_are_401(client: TestClient, mem: InMemoryBus, case: str) -> None:
    body = json.dumps(upsert("a1")).encode()
    now = int(time.time())
    headers = signed_headers(SECRET, body, now)
    if case == "missing":
        headers.pop("X-Tongkuan-Signature")
    elif case == "wrong_secret":
        headers = signed_headers("x" * 40, body, now)
    elif case == "tampered":
        body = body.replace(b"red", b"blue")
    elif case == "old":
        # 30 s past the 300 s window: a margin, because the hook compares against float
        # time.time() taken later, and an int(now) + 301 can sit exactly 300 s away
        headers = signed_headers(SECRET, body, now - 330)
    elif case == "future":
        headers = signed_headers(SECRET, body, now + 330)
    elif case == "malformed_ts":
        headers["X-Tongkuan-Timestamp"] = "yesterday"
    elif case == "no_prefix":
        headers["X-Tongkuan-Signature"] = headers["X-Tongkuan-Signature"].removeprefix("sha256=")
    r = client.post("/v1/hooks/catalog", content=body, headers=headers)
    assert r.status_code == 401
    assert mem.records(CATALOG_ITEMS) == []


def test_inside_the_window_both_directions_is_accepted(client: TestClient) -> None:
    now = int(time.time())
    assert post(client, upsert("a1"), ts=now - 250).status_code == 202
    assert post(client, upsert("a1"), ts=now + 250).status_code == 202


def test_the_window_edge_is_inclusive_and_one_second_past_is_refused() -> None:
    body = b'{"x": 1}'
    ts = 1_000_000

    def check(now: float) -> str | None:
        return verify_signature(SECRET, str(ts), sign(SECRET, str(ts), body), body, 300, now=now)

    assert check(ts + 300) is None and check(ts - 300) is None
    assert check(ts + 301) == check(ts - 301) == "timestamp outside the replay window"


def test_oversized_body_is_413_before_signature_check(client: TestClient) -> None:
    big = [upsert(f"i{i}") for i in range(100)]
    r = post(client, big, secret="wrong" * 10)
    assert r.status_code == 413


def test_unparsable_body_is_400(client: TestClient) -> None:
    assert post(client, None, raw=b"{not json").status_code == 400
    assert post(client, 42).status_code == 400
    assert post(client, []).status_code == 400


class _DownProducer(EventProducer):
    def publish(self, topic, key, value, headers=None) -> None:
        pass

    def flush(self, timeout=None) -> None:
        raise PublishError("broker not acknowledging")


def test_publish_failure_is_503_and_claims_nothing() -> None:
    with TestClient(create_app(producer=_DownProducer(), settings=_settings())) as c:
        r = post(c, [upsert("a1"), upsert("a2")])
    assert r.status_code == 503
    assert "accepted" not in r.json()


def test_a_lazy_producer_without_a_broker_is_503_per_call_then_recovers(mem: InMemoryBus) -> None:
    """The API makes its producer on the first hook call (``LazyProducer``): with no broker the call
    is 503 and nothing is claimed; once the broker is back, the next call publishes."""
    attempts = []

    def factory() -> EventProducer:
        attempts.append(1)
        if len(attempts) == 1:
            raise ConnectionError("NoBrokersAvailable")  # what kafka-python raises on construction
        return mem.producer()

    lazy = LazyProducer(factory)
    assert attempts == []  # made on demand, not at start
    with TestClient(create_app(producer=lazy, settings=_settings())) as c:
        first = post(c, [upsert("a1")])
        second = post(c, [upsert("a1")])
    assert first.status_code == 503 and "accepted" not in first.json()
    assert second.status_code == 202 and len(attempts) == 2
    lazy.close()


def test_feature_events_go_to_their_own_topic(client: TestClient, mem: InMemoryBus) -> None:
    features = {"type": "item_features_updated", "item_id": "a1", "counters": {"clicks": 3}}
    r = post(client, [upsert("a1"), features])
    assert r.status_code == 202 and r.json()["accepted"] == ["a1", "a1"]
    assert [rec.value for rec in mem.records(CATALOG_ITEMS)] != [] and all(
        parse_record(rec.value).type != "item_features_updated" for rec in mem.records(CATALOG_ITEMS))
    (rec,) = mem.records(CATALOG_FEATURES)
    assert rec.key == b"a1" and parse_record(rec.value).counters.clicks == 3


def test_sign_matches_the_documented_scheme() -> None:
    import hashlib
    import hmac

    expected = hmac.new(b"k", b"123." + b"{}", hashlib.sha256).hexdigest()
    assert sign("k", 123, b"{}") == "sha256=" + expected


@pytest.mark.parametrize("secret", ["changethis", "short-but-not-placeholder"])
def test_placeholder_or_short_secret_refused_outside_development(secret: str) -> None:
    assert "TONGKUAN_HOOK__SECRET" in secret_problem(secret, "production")
    assert "TONGKUAN_HOOK__SECRET" in secret_problem(secret, "staging")
    assert secret_problem(secret, "development") is None
    assert secret_problem(SECRET, "production") is None


def test_secret_is_required() -> None:
    with pytest.raises(ValidationError, match="secret"):
        HookSettings()


@pytest.mark.integration
def test_hook_to_kafka_end_to_end(kafka_settings) -> None:
    from events.kafka import KafkaEventConsumer, make_producer

    prefix = unique("e2e")
    producer = make_producer(kafka_settings)
    try:
        with TestClient(create_app(producer=producer, settings=_settings())) as c:
            r = post(
                c,
                [upsert(f"{prefix}-1", 1), upsert(f"{prefix}-2", 2), upsert(f"{prefix}-3", schema_version=3)],
            )
        assert r.status_code == 202 and r.json()["accepted"] == [f"{prefix}-1", f"{prefix}-2"]
    finally:
        producer.close()
    with KafkaEventConsumer([CATALOG_ITEMS], unique("g"), kafka_settings) as consumer:
        ours: list = []
        deadline = time.monotonic() + 15
        while len(ours) < 2 and time.monotonic() < deadline:
            ours += [r for r in drain(consumer, 50, timeout=1) if r.key.decode().startswith(prefix)]
    assert sorted(r.key.decode() for r in ours) == [f"{prefix}-1", f"{prefix}-2"]
    assert {parse_record(r.value).item_id for r in ours} == {f"{prefix}-1", f"{prefix}-2"}


DEEP = [
    b"[" * 100_000,
    b"[" * 100_000 + b"]" * 100_000,
    b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
    json.dumps(upsert("a1", attributes=None)).encode().replace(b"null", b"[" * 40 + b"]" * 40),
]


@pytest.mark.parametrize("body", DEEP, ids=["open", "closed", "objects", "inside_an_event"])
def test_deeply_nested_json_is_400_not_a_recursion_error(body: bytes) -> None:
    with TestClient(create_app(producer=InMemoryBus().producer(), settings=_settings(max_body_bytes=1 << 20))) as c:
        r = post(c, None, raw=body)
    assert r.status_code == 400 and "nested deeper than" in r.json()["detail"]
    parsed = parse_record(body)  # the same rule for a record that reached Kafka another way
    assert parsed.reason == "malformed_json" and "nested deeper than" in parsed.detail


def test_nesting_up_to_the_limit_is_ordinary_json() -> None:
    from events.contract import MAX_JSON_DEPTH, json_depth, loads

    ok = b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH
    assert json_depth(ok) == MAX_JSON_DEPTH and loads(ok) is not None
    assert json_depth(b'["[[[[", {"k": "]]]"}]') == 2  # brackets inside strings do not count
    assert json_depth(b'["\\"[[[[", 1]') == 1  # nor after an escaped quote
