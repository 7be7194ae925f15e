"""A small reliability drill in ``make test``: real Tansu, real Redis (DB 10), real worker and dispatcher
processes, the fast embedder, 150 events; scenarios (a) clean, (b) kill -9 of the worker mid-batch,
(e) poison events, (f) hostile events of every hardening class among 150 good ones. The full drill (2,000 events, real model, all scenarios) is ``make drill``."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from offline.drill import Drill, Stack, StackConfig, build_stream, expected_catalog, write_pictures
from tests.conftest import redis_client

pytestmark = pytest.mark.integration
REDIS_DB = 10


def test_stream_has_every_kind_of_event(tmp_path: Path):
    images = write_pictures(tmp_path, 10, seed=3)
    stream, stats = build_stream(150, images, seed=3)
    assert len(stream) == 150
    assert stats["out_of_order"] > 0 and stats["duplicates"] > 0
    assert {e.kind for e in stream} == {"upsert", "delete"}
    expected = expected_catalog(stream)
    # Versions alone decide: replaying the stream in reverse gives the same catalog.
    assert expected_catalog(reversed(stream)) == expected
    deleted = {e.item_id for e in stream} - set(expected)
    assert deleted, "some items must end deleted"


def test_small_drill_clean_kill_worker_poison(tmp_path: Path):
    redis_client(REDIS_DB).close()  # required (fails under CI=true when missing)
    cfg = StackConfig(redis_db=REDIS_DB, fast_embedder=True, task_timeout_s=8.0, max_batch=32, task_chunk=32)
    stack = Stack(tmp_path / "drill", cfg)
    drill = Drill(stack, events=150, seed=11, timeout_per_scenario=60.0, scenarios="abef", poison_good=150)
    try:
        results = drill.run()
    finally:
        stack.close()
        shutil.rmtree(tmp_path / "drill", ignore_errors=True)
    by = {r.name: r for r in results}
    assert set(by) == {"a", "b", "e", "f"}, [(r.name, r.error) for r in results]
    for r in results:
        assert r.error is None, (r.name, r.error)
        assert (r.lost, r.duplicated, r.stale, r.unexpected, r.wrong_content) == (0, 0, 0, 0, 0), r
        assert r.indexed == r.expected_live > 0
        assert r.passed
    assert by["b"].fault["killed"] == "worker" and by["b"].fault["unacked_at_kill"] >= 1
    assert by["e"].dead_lettered == {
        "malformed_json": 1, "unknown_schema_version": 1, "unsupported": 1, "corrupt": 1,
        "private_address": 1, "too_large": 1, "too_many_pixels": 1,
    }
    f = by["f"]
    assert f.dead_lettered.keys() == {"invalid_event", "malformed_json", "outside_object_root", "private_address",
                                      "timeout"} | ({"dns"} & f.dead_lettered.keys()) | (
                                          {"dns_temporary"} & f.dead_lettered.keys())
    assert sum(f.dead_lettered.values()) == f.fault["poison_events"]  # each once
    assert f.fault["within_attempts"] == f.fault["batches_committed"] > 0 and f.fault["non_ascii_fetched"] > 0
