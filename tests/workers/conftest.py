"""Fixtures for the worker tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

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
