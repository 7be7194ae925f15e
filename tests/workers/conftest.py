"""Fixtures for the worker tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from tests.workers.workers_testlib import ImageServer


@pytest.fixture(scope="module")
def image_server() -> Iterator[ImageServer]:
    srv = ImageServer()
    srv.thread.start()
    try:
        yield srv
    finally:
        srv.httpd.shutdown()
        srv.httpd.server_close()


# Redis DB reserved for the worker tests; emptied after each test that uses it.
REDIS_DB = 13
BROKER = f"redis://127.0.0.1:6379/{REDIS_DB}"


@pytest.fixture
def redis_db():
    client = redis.Redis.from_url(BROKER, socket_timeout=2, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.exceptions.ConnectionError:
        pytest.skip("no Redis on 127.0.0.1:6379")
    yield client
    client.flushdb()
    client.close()
