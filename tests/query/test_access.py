"""API keys at rest and in memory (``query.access``): only a salted scrypt hash is stored, the file
is replaced atomically with mode 0600, the store reloads a changed file (at most once per period)
and keeps the old keys when the new file is broken, an unknown key costs no scrypt, the token
bucket is exact under threads, and the mode decision; the ``tongkuan keys`` command."""

from __future__ import annotations

import asyncio
import json
import logging
import stat
import threading
from pathlib import Path

import pytest

from query import access
from query.access import (
    AccessConfigError,
    KeyedAccess,
    KeyEntry,
    KeyFileError,
    KeyStore,
    OpenAccess,
    RateLimiter,
    access_from_settings,
    add_key,
    read_keys,
    revoke_key,
)
from tongkuan import cli


class FakeClock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


def authenticate(store: KeyStore, key: str):
    return asyncio.run(store.authenticate(key))


def test_the_file_holds_a_salted_hash_never_the_key(tmp_path: Path):
    path = tmp_path / "keys.json"
    k1 = add_key(path, "a", ["search", "search", "feedback"], rate=2.5)
    k2 = add_key(path, "b", ["admin"])
    text = path.read_text()
    assert k1 not in text and k2 not in text
    assert len(k1) >= 43  # token_urlsafe(32): 256 random bits
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    entries = {e.id: e for e in read_keys(path).keys}
    assert entries["a"].scopes == ("feedback", "search") and entries["a"].rate == 2.5
    assert entries["a"].hash.startswith("scrypt$") and entries["a"].hash != entries["b"].hash
    salts = {e.hash.split("$")[4] for e in entries.values()}
    assert len(salts) == 2  # a salt per key
    assert entries["a"].verify(k1) and not entries["a"].verify(k2) and not entries["a"].verify(k1 + "x")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".keys.json.lock", "keys.json"]  # no temp file left


def test_ids_are_unique_and_revoke_removes_one(tmp_path: Path):
    path = tmp_path / "keys.json"
    add_key(path, "a", ["search"])
    with pytest.raises(KeyFileError, match="exists"):
        add_key(path, "a", ["search"])
    add_key(path, "b", ["search"])
    assert revoke_key(path, "a") and not revoke_key(path, "a")
    assert [e.id for e in read_keys(path).keys] == ["b"]


@pytest.mark.parametrize("bad", [
    {"id": "bad id"}, {"scopes": ["root"]}, {"scopes": []}, {"burst": 3}, {"rate": -1}, {"extra": 1},
])
def test_invalid_entries_are_refused(tmp_path: Path, bad):
    path = tmp_path / "keys.json"
    add_key(path, "a", ["search"])
    data = json.loads(path.read_text())
    data["keys"][0].update(bad)
    path.write_text(json.dumps(data))
    with pytest.raises(KeyFileError, match="not a valid keys file"):
        read_keys(path)


def test_concurrent_adds_lose_nothing(tmp_path: Path):
    path = tmp_path / "keys.json"
    threads = [threading.Thread(target=add_key, args=(path, f"k{i}", ["search"])) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(e.id for e in read_keys(path).keys) == sorted(f"k{i}" for i in range(8))


def test_the_store_reloads_a_changed_file_at_most_once_per_period(tmp_path: Path):
    path = tmp_path / "keys.json"
    key = add_key(path, "a", ["search"])
    clock = FakeClock()
    store = KeyStore(path, reload_s=2.0, clock=clock)
    assert authenticate(store, key).id == "a"
    revoke_key(path, "a")
    clock.now += 1.9
    assert authenticate(store, key) is not None  # not looked at yet
    clock.now += 0.2
    assert authenticate(store, key) is None
    assert len(store) == 0


def test_a_broken_file_keeps_the_keys_loaded_before(tmp_path: Path, caplog):
    path = tmp_path / "keys.json"
    key = add_key(path, "a", ["search"])
    clock = FakeClock()
    store = KeyStore(path, clock=clock)
    path.write_text("{ half written")
    clock.now += 5
    with caplog.at_level(logging.ERROR):
        assert authenticate(store, key).id == "a"
        clock.now += 5
        assert authenticate(store, key).id == "a"
    assert len([r for r in caplog.records if "keeping the 1 keys" in r.getMessage()]) == 1  # said once


def test_an_unknown_key_runs_no_scrypt_and_a_known_one_runs_it_once(tmp_path: Path, monkeypatch):
    path = tmp_path / "keys.json"
    key = add_key(path, "a", ["search"])
    store = KeyStore(path, clock=FakeClock())
    calls = []
    real = KeyEntry.verify
    monkeypatch.setattr(KeyEntry, "verify", lambda self, k: calls.append(k) or real(self, k))
    for i in range(20):
        assert authenticate(store, f"guess-{i}") is None
    assert calls == []
    for _ in range(5):
        assert authenticate(store, key).id == "a"
    assert calls == [key]


def test_the_token_bucket_is_exact_under_threads():
    clock = FakeClock()
    limiter = RateLimiter(clock)
    entry = KeyEntry(id="a", lookup="0" * 8, hash="scrypt$1$1$1$AA$AA", scopes=("search",), rate=10, burst=25)
    allowed = []
    lock = threading.Lock()

    def hammer():
        for _ in range(50):
            if limiter.wait_s(entry) == 0:
                with lock:
                    allowed.append(1)

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(allowed) == 25  # the burst, not one more
    assert limiter.wait_s(entry) == pytest.approx(0.1)
    clock.now += 1.0
    assert sum(limiter.wait_s(entry) == 0 for _ in range(20)) == 10  # 10/s refill
    unlimited = entry.model_copy(update={"rate": None, "burst": None})
    assert all(limiter.wait_s(unlimited) == 0 for _ in range(100))


def test_the_mode_decision(tmp_path: Path, caplog):
    path = tmp_path / "keys.json"
    with pytest.raises(AccessConfigError, match="outside development"):
        access_from_settings(None, "production")
    with caplog.at_level(logging.WARNING):
        assert isinstance(access_from_settings(None, "development"), OpenAccess)
    assert any("OPEN" in r.getMessage() for r in caplog.records)
    path.write_text('{"version": 1, "keys": []}')
    with pytest.raises(AccessConfigError, match="holds no keys"):
        access_from_settings(path, "production")
    assert isinstance(access_from_settings(path, "development"), KeyedAccess)  # keys file: keys needed
    add_key(path, "a", ["search"])
    assert isinstance(access_from_settings(path, "production"), KeyedAccess)


def test_the_keys_command(tmp_path: Path, capsys, monkeypatch):
    path = tmp_path / "keys.json"
    monkeypatch.setenv("TONGKUAN_API__KEYS_FILE", str(path))
    assert cli.main(["keys", "add", "--id", "shop", "--scopes", "search,feedback", "--rate", "5", "--burst", "10"]) == 0
    out = capsys.readouterr()
    key = out.out.strip()
    assert len(key.splitlines()) == 1 and "only this once" in out.err
    entry = read_keys(path).keys[0]
    assert entry.verify(key) and (entry.rate, entry.burst) == (5, 10)

    assert cli.main(["keys", "--file", str(path), "list"]) == 0
    listing = capsys.readouterr().out
    assert "shop" in listing and "feedback,search" in listing and "5/s burst 10" in listing
    assert key not in listing and entry.hash not in listing and "scrypt" not in listing

    assert cli.main(["keys", "add", "--id", "x", "--scopes", "search,root"]) == 2
    assert cli.main(["keys", "add", "--id", "x", "--scopes", "search", "--burst", "3"]) == 2
    assert cli.main(["keys", "add", "--id", "shop", "--scopes", "search"]) == 2  # exists
    assert "exists" in capsys.readouterr().err
    assert cli.main(["keys", "revoke", "--id", "shop"]) == 0
    assert cli.main(["keys", "revoke", "--id", "shop"]) == 1
    assert read_keys(path).keys == ()
    monkeypatch.delenv("TONGKUAN_API__KEYS_FILE")
    assert cli.main(["keys", "list"]) == 2
    assert "TONGKUAN_API__KEYS_FILE" in capsys.readouterr().err


def test_scopes_are_the_documented_ones():
    assert set(access.SCOPES) == {"search", "feedback", "admin"}
