"""The API's defences, on the app ``tongkuan.api.create_app`` builds (a fake searcher stands in for the
model and the index): API keys and scopes (401/403), per-key rate limits (429 + Retry-After), a key
revoked in the file refused after the reload, CORS, the admin-only docs and metrics, the start-up
modes (production refuses without keys, development runs open and says so), and — on a real
uvicorn server with raw sockets — slow bodies (408), a client that goes away mid-upload (one log
line, no traceback) and the decode slots (503 + Retry-After when they stay busy)."""

from __future__ import annotations

import logging
import re
import select
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY

from events.bus import InMemoryBus
from events.hook import HookSettings
from query.access import AccessConfigError, access_from_settings, add_key, revoke_key
from query.models import SearchResponse
from tongkuan.api import create_app
from tongkuan.config import ApiConfig, ApiSettings

SHOP_ORIGIN = "https://shop.example"


class FakeSearcher:
    """Answers every search; with a ``gate``, each search waits for it (a slow decode)."""

    max_image_bytes = 100_000

    def __init__(self, gate: threading.Event | None = None):
        self.gate = gate
        self.entered = threading.Event()
        self.calls = 0

    def search_bytes(self, data: bytes, *, limit: int, max_objects: int, filters=None, text=None,
                     explain=False) -> SearchResponse:
        self.calls += 1
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(10), "the test never opened the gate"
        return SearchResponse(model_id="fake", objects=[], timings_ms={"decode": 0.0, "bytes": float(len(data))})

    def similar_items(self, item_id: str, *, limit: int):
        return []


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_app(*, environment: str = "production", searcher=None, access=None, **api):
    cfg = ApiConfig(environment=environment, hook=HookSettings(secret="x" * 40), api=ApiSettings(**api))
    return create_app(config=cfg, searcher=searcher or FakeSearcher(), producer=InMemoryBus().producer(),
                      access=access)


def rejected(reason: str) -> float:
    return REGISTRY.get_sample_value("tongkuan_api_rejected_total", {"reason": reason}) or 0.0


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    path = tmp_path / "keys.json"
    made = {
        "search": add_key(path, "shop-web", ["search"]),
        "admin": add_key(path, "ops", ["admin"]),
        "limited": add_key(path, "partner", ["search"], rate=0.4, burst=2),
    }
    return path, made


@pytest.fixture
def keyed(keys) -> Iterator[tuple[TestClient, dict[str, str]]]:
    path, made = keys
    with TestClient(make_app(keys_file=path)) as client:
        yield client, made


# --------------------------------------------------------------------------------------------------
# Keys and scopes


def test_search_without_a_key_is_401_with_www_authenticate(keyed):
    client, _ = keyed
    before = rejected("unauthorized")
    for r in (client.post("/v1/search", content=b"img"), client.get("/v1/items/a/similar")):
        assert r.status_code == 401, r.text
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
    assert rejected("unauthorized") == before + 2


@pytest.mark.parametrize("headers", [bearer("not-a-key"), {"X-API-Key": "not-a-key"},
                                     {"Authorization": "Basic c2hvcDp3ZWI="}, bearer("")])
def test_an_unknown_or_malformed_key_is_401(keyed, headers):
    client, _ = keyed
    r = client.post("/v1/search", content=b"img", headers=headers)
    assert r.status_code == 401
    assert "WWW-Authenticate" in r.headers


def test_a_key_is_accepted_as_bearer_or_x_api_key(keyed):
    client, made = keyed
    for headers in (bearer(made["search"]), {"X-API-Key": made["search"]}):
        r = client.post("/v1/search", content=b"img", headers=headers)
        assert r.status_code == 200, r.text
        assert r.json()["model_id"] == "fake"
    assert client.get("/v1/items/a/similar", headers=bearer(made["search"])).status_code == 200


def test_a_key_without_the_scope_is_403(keyed):
    client, made = keyed
    before = rejected("forbidden")
    r = client.post("/v1/search", content=b"img", headers=bearer(made["admin"]))
    assert r.status_code == 403
    assert 'error="insufficient_scope"' in r.headers["WWW-Authenticate"]
    assert rejected("forbidden") == before + 1


def test_the_key_is_checked_before_the_body_or_the_query_is(keyed):
    client, _ = keyed
    r = client.post("/v1/search?limit=9999", content=b"\xff" * 200_000)  # too many hits, too large
    assert r.status_code == 401


def test_a_revoked_key_is_refused_after_the_reload(keys):
    path, made = keys
    clock = FakeClock()
    access = access_from_settings(path, "production", reload_s=2.0, clock=clock)
    with TestClient(make_app(keys_file=path, access=access)) as client:
        assert client.post("/v1/search", content=b"img", headers=bearer(made["search"])).status_code == 200
        assert revoke_key(path, "shop-web")
        clock.now += 1.0  # not looked at again yet: at most one look every 2 s
        assert client.post("/v1/search", content=b"img", headers=bearer(made["search"])).status_code == 200
        clock.now += 1.5
        r = client.post("/v1/search", content=b"img", headers=bearer(made["search"]))
        assert r.status_code == 401 and "revoked" in r.text
        assert client.post("/v1/search", content=b"img", headers=bearer(made["limited"])).status_code == 200
        new = add_key(path, "shop-web", ["search"])  # and a key added is accepted without a restart
        clock.now += 2.5
        assert client.post("/v1/search", content=b"img", headers=bearer(new)).status_code == 200


def test_over_the_rate_is_429_with_retry_after_rounded_up(keys):
    path, made = keys
    clock = FakeClock()
    access = access_from_settings(path, "production", clock=clock)
    before = rejected("rate_limited")
    with TestClient(make_app(keys_file=path, access=access)) as client:
        def post():
            return client.post("/v1/search", content=b"img", headers=bearer(made["limited"]))

        assert [post().status_code for _ in range(2)] == [200, 200]  # the burst
        r = post()
        assert r.status_code == 429
        assert r.headers["Retry-After"] == "3"  # one token at 0.4/s: 2.5 s, rounded up
        clock.now += 2.4
        assert post().status_code == 429
        clock.now += 0.2
        assert post().status_code == 200
        # other keys have their own bucket (or none)
        assert all(client.post("/v1/search", content=b"img", headers=bearer(made["search"])).status_code == 200
                   for _ in range(5))
    assert rejected("rate_limited") == before + 2


# --------------------------------------------------------------------------------------------------
# Admin routes, health, CORS


@pytest.mark.parametrize("path", ["/metrics", "/docs", "/redoc", "/openapi.json"])
def test_metrics_and_docs_need_the_admin_scope(keyed, path):
    client, made = keyed
    assert client.get(path).status_code == 401
    assert client.get(path, headers=bearer(made["search"])).status_code == 403
    r = client.get(path, headers=bearer(made["admin"]))
    assert r.status_code == 200, r.text
    if path == "/metrics":
        assert "tongkuan_api_rejected_total" in r.text
    if path == "/openapi.json":
        schema = r.json()
        assert "/v1/search" in schema["paths"] and "/docs" not in schema["paths"]
        assert {"HTTPBearer", "APIKeyHeader"} <= set(schema["components"]["securitySchemes"])
    if path in ("/docs", "/redoc"):
        assert "/v1/items/{item_id}/similar" in r.text  # the schema is inline: the page needs no second call


def test_health_stays_open(keyed):
    client, _ = keyed
    assert client.get("/healthz").json() == {"status": "ok"}


def _preflight(client: TestClient, origin: str):
    return client.options("/v1/search", headers={"Origin": origin, "Access-Control-Request-Method": "POST",
                                                 "Access-Control-Request-Headers": "authorization,content-type"})


def test_cors_allows_only_the_configured_origins(keys):
    path, made = keys
    with TestClient(make_app(keys_file=path, cors_origins=[SHOP_ORIGIN])) as client:
        ok = _preflight(client, SHOP_ORIGIN)
        assert ok.status_code == 200
        assert ok.headers["Access-Control-Allow-Origin"] == SHOP_ORIGIN
        assert "authorization" in ok.headers["Access-Control-Allow-Headers"].lower()
        denied = _preflight(client, "https://evil.example")
        assert denied.status_code == 400 and "Access-Control-Allow-Origin" not in denied.headers
        r = client.post("/v1/search", content=b"img", headers={"Origin": SHOP_ORIGIN, **bearer(made["search"])})
        assert r.headers["Access-Control-Allow-Origin"] == SHOP_ORIGIN
        assert "retry-after" in r.headers["Access-Control-Expose-Headers"].lower()


def test_no_cors_origin_is_allowed_by_default(keys):
    path, made = keys
    with TestClient(make_app(keys_file=path)) as client:
        assert "Access-Control-Allow-Origin" not in _preflight(client, SHOP_ORIGIN).headers
        r = client.post("/v1/search", content=b"img", headers={"Origin": SHOP_ORIGIN, **bearer(made["search"])})
        assert r.status_code == 200 and "Access-Control-Allow-Origin" not in r.headers


# --------------------------------------------------------------------------------------------------
# Start-up modes


@pytest.mark.parametrize("environment", ["production", "staging"])
def test_production_refuses_to_start_without_keys(tmp_path, environment):
    with pytest.raises(AccessConfigError, match="TONGKUAN_API__KEYS_FILE"):
        with TestClient(make_app(environment=environment)):
            pass
    empty = tmp_path / "keys.json"
    empty.write_text('{"version": 1, "keys": []}')
    with pytest.raises(AccessConfigError, match="holds no keys"):
        with TestClient(make_app(environment=environment, keys_file=empty)):
            pass


def test_a_bad_keys_file_refuses_to_start_in_every_environment(tmp_path):
    bad = tmp_path / "keys.json"
    bad.write_text("{not json")
    for environment in ("production", "development"):
        with pytest.raises(AccessConfigError, match="not a valid keys file"):
            with TestClient(make_app(environment=environment, keys_file=bad)):
                pass
    with pytest.raises(AccessConfigError, match="cannot read"):
        with TestClient(make_app(environment="development", keys_file=tmp_path / "missing.json")):
            pass


def test_development_without_keys_runs_open_and_says_so(caplog):
    caplog.set_level(logging.WARNING)
    with TestClient(make_app(environment="development")) as client:
        assert client.post("/v1/search", content=b"img").status_code == 200
        assert client.get("/metrics").status_code == 200
        assert client.get("/docs").status_code == 200
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("the API is OPEN" in m and "without a key" in m for m in warnings), warnings


def test_development_with_a_keys_file_still_needs_keys(keys):
    path, made = keys
    with TestClient(make_app(environment="development", keys_file=path)) as client:
        assert client.post("/v1/search", content=b"img").status_code == 401
        assert client.post("/v1/search", content=b"img", headers=bearer(made["search"])).status_code == 200


# --------------------------------------------------------------------------------------------------
# On a real server: slow bodies, disconnects, busy decode slots


@contextmanager
def serving(app) -> Iterator[int]:
    """``app`` on uvicorn (h11) on a free port of 127.0.0.1, in a thread; yields the port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, http="h11", lifespan="on", log_config=None,
                                           timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        yield port
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def _head(port: int, length: int) -> bytes:
    return (f"POST /v1/search HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: image/jpeg\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


def _read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):  # the socket's timeout fails the test if the server never closes
        data += chunk
    return data


def test_a_stalled_body_is_answered_408_and_closed_within_the_idle_timeout(caplog):
    caplog.set_level(logging.INFO)
    before = rejected("slow_body")
    app = make_app(environment="development", body_idle_timeout_s=0.5, min_body_rate_bps=0)
    with serving(app) as port, socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(_head(port, 50_000) + b"\xff" * 1000)  # then nothing more
        t0 = time.monotonic()
        answer = _read_until_closed(sock)
        waited = time.monotonic() - t0
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"no body data for 0.5 s" in answer
    assert 0.4 <= waited < 2.5, waited
    assert rejected("slow_body") == before + 1
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


def test_a_trickling_body_is_408_once_under_the_minimum_rate():
    app = make_app(environment="development", body_idle_timeout_s=5, min_body_rate_bps=2000,
                   body_rate_grace_s=0.3)
    with serving(app) as port, socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(_head(port, 50_000))
        t0 = time.monotonic()
        while time.monotonic() - t0 < 4:  # ~200 bytes/s: a chunk well inside the idle timeout, every time
            if select.select([sock], [], [], 0.05)[0]:
                break
            sock.sendall(b"\xff" * 10)
        answer = _read_until_closed(sock)
        waited = time.monotonic() - t0
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"bytes/s on average; the minimum is 2000" in answer
    assert waited < 2.0, waited


def test_a_body_under_the_cap_and_fast_enough_is_searched():
    app = make_app(environment="development", body_idle_timeout_s=0.5)
    with serving(app) as port:
        r = httpx.post(f"http://127.0.0.1:{port}/v1/search", content=b"\xff" * 60_000, timeout=5)
        assert r.status_code == 200 and r.json()["timings_ms"]["bytes"] == 60_000
        r = httpx.post(f"http://127.0.0.1:{port}/v1/search", content=b"\xff" * 100_001, timeout=5)
        assert r.status_code == 413


def test_a_client_that_goes_away_mid_body_is_one_log_line_without_traceback(caplog):
    caplog.set_level(logging.DEBUG)
    searcher = FakeSearcher()
    app = make_app(environment="development", searcher=searcher, body_idle_timeout_s=5)
    with serving(app) as port:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(_head(port, 50_000) + b"\xff" * 1000)
            time.sleep(0.5)  # the route is reading the body now (usually: see the count below)
        deadline = time.monotonic() + 5
        while not any("went away" in r.getMessage() or r.exc_info for r in caplog.records):
            assert time.monotonic() < deadline, "the route never noticed the disconnect"
            time.sleep(0.02)
        time.sleep(0.2)  # anything the server logs after the route ended
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    gone = [r for r in caplog.records if "went away" in r.getMessage()]
    assert len(gone) == 1 and gone[0].levelno == logging.INFO
    # 1000 when the route had read what was sent; 0 when the disconnect came first (a loaded CI
    # machine): uvicorn then answers the route's first receive with the disconnect and drops the
    # bytes it had buffered.
    assert re.search(r"after (1000|0) bytes of the body$", gone[0].getMessage()), gone[0].getMessage()
    assert searcher.calls == 0


def test_decode_slots_shed_the_excess_with_503_and_retry_after(caplog):
    caplog.set_level(logging.INFO)
    gate = threading.Event()
    searcher = FakeSearcher(gate)
    app = make_app(environment="development", searcher=searcher, max_concurrent_decodes=1,
                   decode_queue_timeout_s=0.2)
    before = rejected("busy")
    with serving(app) as port, ThreadPoolExecutor(4) as pool:
        def post() -> httpx.Response:
            return httpx.post(f"http://127.0.0.1:{port}/v1/search", content=b"img", timeout=10)

        try:
            first = pool.submit(post)
            assert searcher.entered.wait(5)  # the only slot is taken
            shed = [f.result() for f in [pool.submit(post) for _ in range(3)]]
        finally:
            gate.set()
        assert first.result().status_code == 200
        assert post().status_code == 200  # the slot came back
    assert [r.status_code for r in shed] == [503] * 3
    assert all(r.headers["Retry-After"] == "1" and "decode slots are busy" in r.text for r in shed)
    assert searcher.calls == 2
    assert rejected("busy") == before + 3
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
