"""Fixtures for the worker tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import redis_client
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
    client = redis_client(REDIS_DB)
    yield client
    client.flushdb()
    client.close()
