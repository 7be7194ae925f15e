"""Fixtures for the feature-store tests.

``online`` runs a test over both online stores, SQLite (embedded) and Redis (127.0.0.1:6379,
DB 14; missing: skipped, or failed under ``CI=true``, see ``tests/conftest.py``). Each store gets
its own data dir and Feast project; the Redis keys of a project end with its name, and the
fixture checks that ``teardown`` left none behind.
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Callable, Iterator

import pytest

from feature_store.settings import FeatureStoreSettings, RedisOnlineSettings, SqliteOnlineSettings
from tests.conftest import redis_client

REDIS_DB = 14
_counter = itertools.count()


def unique_project(prefix: str = "t") -> str:
    return f"{prefix}_{next(_counter)}_{uuid.uuid4().hex[:8]}"


class Clock:
    """A settable clock (unix seconds) for stores and aggregators."""

    def __init__(self, now: float | None = None) -> None:
        self.now = time.time() if now is None else now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(params=["sqlite", "redis"])
def online(request) -> Iterator[SqliteOnlineSettings | RedisOnlineSettings]:
    if request.param == "redis":
        client = redis_client(REDIS_DB)
        client.close()
        yield RedisOnlineSettings(url=f"redis://127.0.0.1:6379/{REDIS_DB}")
    else:
        yield SqliteOnlineSettings()


def _make_stores(tmp_path, online_settings) -> Iterator[Callable]:
    from feature_store.store import ItemFeatureStore

    made = []

    def make(clock: Callable[[], float] = time.time, project: str | None = None, data_dir=None):
        project = project or unique_project()
        settings = FeatureStoreSettings(data_dir=data_dir or tmp_path / project, project=project,
                                        online=online_settings)
        store = ItemFeatureStore(settings, clock=clock)
        store.apply()
        made.append(store)
        return store

    yield make
    projects = set()
    for store in made:
        if store.settings.project not in projects:
            projects.add(store.settings.project)
            store.teardown()
        else:
            store.close()
    if isinstance(online_settings, RedisOnlineSettings):
        client = redis_client(REDIS_DB)
        try:
            for project in projects:
                left = list(client.scan_iter(match=b"*" + project.encode()))
                assert not left, f"teardown left {len(left)} Redis keys of {project}"
        finally:
            client.close()


@pytest.fixture
def make_store(tmp_path, online) -> Iterator[Callable]:
    """``make_store(clock=..., project=...)`` → an applied ``ItemFeatureStore`` on ``online``."""
    yield from _make_stores(tmp_path, online)


@pytest.fixture
def make_sqlite_store(tmp_path) -> Iterator[Callable]:
    """The same on SQLite only (tests of the offline side, where the online store is irrelevant)."""
    yield from _make_stores(tmp_path, SqliteOnlineSettings())
