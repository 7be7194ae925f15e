"""Search while the embedded index ingests, as in ``make up``: real Tansu, Redis (DB 13), the worker
(real model, owner of the Edge index, serving reads of it), the dispatcher and the API process. Items
posted through the hook are found by ``POST /v1/search`` through the API, and searches keep being
answered while a burst is ingested (``python -m offline bench-freshness`` at a small scale; the
figures are the bench's, not asserted here)."""

from __future__ import annotations

import argparse

import pytest

from offline.bench.freshness import run
from tests.conftest import DATA, grocery_root, redis_client

pytestmark = pytest.mark.integration


def test_items_posted_through_the_hook_are_found_through_the_api_while_ingesting():
    redis_client(13).close()  # required (fails under CI=true when missing)
    grocery_root()
    args = argparse.Namespace(data=str(DATA), split="train", rate=5.0, seconds=3.0, probe_every=1, probe_interval_ms=100.0, unfiltered=False, give_up_s=30.0,
                              queries=5, burst=60, burst_timeout_s=90.0, optimize_every=5000, redis_db=13)
    report = run(args)
    fresh = report["freshness_s"]
    assert fresh["n"] == 15 and fresh["not_found"] == 0 and fresh["probe_errors"] == 0, fresh
    assert report["burst"]["indexed"] == 60
    assert report["search_under_burst_ms"]["n"] > 0 and report["search_idle_ms"]["n"] == 5
