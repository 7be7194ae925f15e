"""``ItemFeatureStore`` over both online stores: an online read returns what was pushed, by every
read path alike; TTLs hold online as offline; the online store can be rebuilt from the offline
files (a Redis that keeps nothing on disk); settings refuse what they do not know."""

from __future__ import annotations

import sqlite3
import subprocess
import sys

import pytest
from pydantic import ValidationError

from feature_store.features import BEHAVIOUR_FEATURES, FEATURES, INTEGER_FEATURES, PROFILE_FEATURES
from feature_store.settings import FeatureStoreSettings, RedisOnlineSettings
from tests.conftest import redis_client
from tests.feature_store.conftest import REDIS_DB, Clock

READS = ("online", "online_views", "online_via_feast")


def behaviour_row(item: str, t: float, k: int) -> dict:
    return {"item_id": item, "event_timestamp": t,
            **{f: (k if f in INTEGER_FEATURES else k + 0.25) for f in BEHAVIOUR_FEATURES}}


def profile_row(item: str, t: float, k: int, **over) -> dict:
    row = {"item_id": item, "event_timestamp": t, "price": 10.0 + k, "price_to_category_median": 1.5,
           "rating": 4.5, "rating_count": 12.0, "shop_score": None, "first_seen_at": t - 2 * 86400}
    return {**row, **over}


def without_age(found: dict) -> dict:
    return {i: {f: v for f, v in row.items() if f != "item_age_days"} for i, row in found.items()}


def test_online_read_returns_what_was_pushed_by_every_read_path(make_store):
    clock = Clock()
    store = make_store(clock)
    t = clock.now - 60
    ids = [f"item-{k}" for k in range(60)]
    assert store.push("item_behaviour", [behaviour_row(i, t, k) for k, i in enumerate(ids)]) == 60
    assert store.push("item_profile", [profile_row(i, t, k) for k, i in enumerate(ids[:30])]) == 30

    answers = {read: getattr(store, read)([*ids, "never-pushed"]) for read in READS}
    got = answers["online"]
    assert set(got) == set(ids)  # an unknown item is absent: the ranker falls back
    assert list(got["item-3"]) == list(FEATURES)
    assert got["item-3"]["clicks_7d"] == 3 and isinstance(got["item-3"]["clicks_7d"], int)
    assert got["item-3"]["sales_30d"] == 3.25 and got["item-3"]["ctr_7d"] == 3.25
    assert got["item-3"]["price"] == 13.0 and got["item-3"]["rating_count"] == 12.0
    assert got["item-3"]["shop_score"] is None  # pushed as None, read as None
    assert got["item-3"]["item_age_days"] == pytest.approx(2 + 60 / 86400)
    assert all(got["item-40"][f] is None for f in PROFILE_FEATURES)  # no profile row
    for read in READS[1:]:
        assert without_age(answers[read]) == without_age(got), read
        assert answers[read]["item-3"]["item_age_days"] == pytest.approx(got["item-3"]["item_age_days"])

    # a newer row replaces the old one online, in every path
    store.push("item_behaviour", [behaviour_row("item-3", t + 30, 99)])
    for read in READS:
        assert getattr(store, read)(["item-3"])["item-3"]["clicks_7d"] == 99, read


def test_online_reads_apply_the_view_ttls(make_store):
    clock = Clock()
    store = make_store(clock)
    old = clock.now - 3 * 86400  # past the behaviour TTL (2 days), within the profile TTL (30 days)
    store.push("item_behaviour", [behaviour_row("stale", old, 5), behaviour_row("fresh", clock.now - 5, 6)])
    store.push("item_profile", [profile_row("stale", old, 5)])
    for read in READS:
        got = getattr(store, read)(["stale", "fresh"])
        assert got["stale"]["clicks_1d"] is None and got["stale"]["price"] == 15.0, read
        assert got["fresh"]["clicks_1d"] == 6, read
    clock.advance(28 * 86400)  # now the profile row is past 30 days too, and "fresh" past 2
    for read in READS:
        assert getattr(store, read)(["stale", "fresh"]) == {}, read


def _lose_online_data(store) -> None:
    if isinstance(store.settings.online, RedisOnlineSettings):
        client = redis_client(REDIS_DB)
        try:
            for key in client.scan_iter(match=b"*" + store.settings.project.encode()):
                client.delete(key)
        finally:
            client.close()
    else:
        store.close()
        db = sqlite3.connect(store.config.online_store.path)
        with db:
            for (table,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall():
                db.execute(f'DELETE FROM "{table}"')
        db.close()


def test_rebuild_online_restores_the_online_store_from_the_offline_files(make_store):
    clock = Clock()
    store = make_store(clock)
    t = clock.now - 3600
    ids = [f"r-{k}" for k in range(5)]
    store.push("item_behaviour", [behaviour_row(i, t, k) for k, i in enumerate(ids)])
    store.push("item_behaviour", [behaviour_row("r-1", t + 60, 7)])  # the newest row must win
    store.push("item_profile", [profile_row(i, t, k) for k, i in enumerate(ids)])
    before = store.online(ids)
    _lose_online_data(store)
    assert store.online(ids) == {}
    assert store.rebuild_online() == 5
    after = store.online(ids)
    assert without_age(after) == without_age(before) and after["r-1"]["clicks_1d"] == 7
    assert without_age(store.online_via_feast(ids)) == without_age(before)


def test_settings_refuse_unknown_keys_and_build_the_redis_connection_string():
    with pytest.raises(ValidationError):
        FeatureStoreSettings(online={"type": "sqlite", "pth": "x.db"})
    with pytest.raises(ValidationError):
        FeatureStoreSettings(online={"type": "dynamodb"})
    with pytest.raises(ValidationError):
        FeatureStoreSettings(projct="x")
    with pytest.raises(ValidationError):
        RedisOnlineSettings(url="http://127.0.0.1:6379")
    redis = FeatureStoreSettings(online={"type": "redis", "url": "redis://:s%40cret@cache:6380/3"}).online
    assert redis.connection_string() == "cache:6380,db=3,password=s@cret"


def test_the_feature_names_import_without_feast():
    code = ("import sys; from feature_store.features import FEATURES; "
            "assert 'feast' not in sys.modules, 'feature_store.features imported feast'; print(len(FEATURES))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(len(FEATURES)) == "25"
