"""The batch logic of the ingest task (``workers.batch``) and the thin task around it, on a real
worker runtime (generation state, write targets, Edge index) with the thumbnail embedder, a scripted
fetcher and a recording dead-letter producer. Celery runs eagerly (``Task.apply``) where retries
matter."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from prometheus_client import REGISTRY

from events.contract import decode_task
from tests.workers.workers_testlib import (
    JPEG,
    PNG,
    gone,
    image_bytes,
    payload,
    scripted_runtime,
    serving_index,
    sourced,
    transient,
    up,
)
from workers import runtime as worker_runtime
from workers.batch import DeadLetterUnavailable, apply_batch
from workers.fetch import FetchError
from workers.tasks import apply_catalog_events

RED, BLUE, GREEN = image_bytes((220, 20, 20)), image_bytes((20, 20, 220)), image_bytes((20, 200, 20))
SCRIPT = {"img/a": RED, "img/b": BLUE, "img/c": GREEN, "img/j": JPEG, "img/p": PNG}


@pytest.fixture
def runtime(tmp_path):
    rt = scripted_runtime(tmp_path, dict(SCRIPT), task_max_retries=3, retry_backoff_s=0.01, retry_backoff_max_s=0.02)
    previous = worker_runtime.set_runtime(rt)
    yield rt
    worker_runtime.set_runtime(previous)
    rt.close()


def run_task(*events) -> dict:
    """Through Celery, eagerly (retries included)."""
    res = apply_catalog_events.apply(args=[payload(*events)])
    assert res.successful(), res.traceback
    return res.get()


def live(rt) -> dict[str, int]:
    ids = [k.removeprefix("img/") for k in rt.fetcher.script]
    return {r.item_id: r.version for r in serving_index(rt).retrieve(ids)}


def sample(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_upserts_are_indexed_with_the_result_shape(runtime):
    before = sample("tongkuan_ingest_event_to_searchable_seconds_count", op="upsert")
    result = run_task(up("a"), up("b", 2), up("c", 3, event_time=time.time() - 2))
    assert set(result) == {"indexed", "deleted", "stale", "dead_lettered"}
    assert sorted(result["indexed"]) == ["a", "b", "c"]
    assert result["deleted"] == result["stale"] == result["dead_lettered"] == []
    assert live(runtime) == {"a": 1, "b": 2, "c": 3}
    assert sample("tongkuan_ingest_event_to_searchable_seconds_count", op="upsert") == before + 3
    rec = serving_index(runtime).retrieve(["c"])[0]
    assert rec.payload["title"] == "title c" and rec.shard == "Shoes"


def test_redelivery_is_harmless(runtime):
    first, second = run_task(up("a", 4), up("b", 4)), run_task(up("a", 4), up("b", 4))
    assert sorted(first["indexed"]) == sorted(second["indexed"]) == ["a", "b"]
    assert serving_index(runtime).count() == 2 and live(runtime) == {"a": 4, "b": 4}


def test_deletes_and_stale_versions(runtime):
    run_task(up("a", 1), up("b", 5))
    result = run_task(gone("a", 2), up("b", 3))
    assert result["deleted"] == ["a"] and result["stale"] == ["b"]
    # A late create older than the delete's tombstone does not resurrect the item.
    late = run_task(up("a", 1), gone("b", 4))
    assert sorted(late["stale"]) == ["a", "b"]
    assert live(runtime) == {"b": 5}


def test_a_batch_given_several_events_of_one_item_applies_the_contract_rule(runtime):
    result = run_task(up("a", 1), up("a", 3, image="img/b"), gone("a", 2), up("c", 7), gone("c", 7))
    assert result["indexed"] == ["a"] and result["deleted"] == ["c"]
    assert serving_index(runtime).retrieve(["a"])[0].payload["image"] == "img/b"
    assert live(runtime) == {"a": 3}


def test_permanent_failures_are_dead_lettered_with_reason_and_the_rest_goes_on(runtime):
    runtime.fetcher.script.update({
        "img/404": FetchError("not_found", "HTTP 404"),
        "img/big": FetchError("too_large", "Content-Length 9e9"),
        "img/ssrf": FetchError("private_address", "10.0.0.1"),
        "img/junk": b"this is not an image at all",
        "img/trunc": JPEG[: len(JPEG) // 2],
    })
    events = [up("a"), up("x404", image="img/404"), up("xbig", image="img/big"), up("xssrf", image="img/ssrf"),
              up("xjunk", image="img/junk"), up("xtrunc", image="img/trunc"), up("b")]
    task_payload = payload(*events) + [{"event": {"type": "item_features_updated", "item_id": "feat"}}]
    before = sample("tongkuan_dlq_events_total", reason="not_found")
    res = apply_catalog_events.apply(args=[task_payload])
    result = res.get()
    assert sorted(result["indexed"]) == ["a", "b"]
    got = {d["item_id"]: d["reason"] for d in result["dead_lettered"]}
    assert got == {"x404": "not_found", "xbig": "too_large", "xssrf": "private_address", "xjunk": "unsupported",
                   "xtrunc": "corrupt", "feat": "invalid_event"}
    recs = runtime.dead_letters.records
    assert len(recs) == 6 and all(topic == "catalog.items.dlq" for topic, *_ in recs)
    by_key = {key: letter for _, key, letter, _ in recs}
    x404 = events[1]
    assert by_key["x404"].original_bytes() == sourced(x404)[0].raw  # the original record, for a replay
    assert by_key["x404"].reason == "not_found" and "404" in by_key["x404"].detail
    assert by_key["x404"].stage == "task" and by_key["x404"].attempts == 1
    assert all(h == {"x-dlq-reason": letter.reason, "x-dlq-stage": "task"} for _, _, letter, h in recs)
    assert runtime.dead_letters.flushes == 1
    assert sample("tongkuan_dlq_events_total", reason="not_found") == before + 1


def test_transient_failures_retry_only_those_items_and_results_accumulate(runtime):
    runtime.fetcher.script["img/flaky"] = [transient("timeout"), transient("http_unavailable"), RED]
    result = run_task(up("a"), up("flaky"), up("b"))
    assert sorted(result["indexed"]) == ["a", "b", "flaky"]
    assert result["dead_lettered"] == []
    # a and b were fetched once; flaky three times (two retries of a one-event batch).
    assert runtime.fetcher.calls.count("img/a") == 1 and runtime.fetcher.calls.count("img/flaky") == 3


def test_transient_failures_are_dead_lettered_after_max_retries(runtime):
    runtime.fetcher.script["img/down"] = [transient("connection")]
    result = run_task(up("down"), up("a"))
    assert result["indexed"] == ["a"]
    assert result["dead_lettered"] == [{"item_id": "down", "reason": "connection"}]
    retries = runtime.worker.task_max_retries
    assert runtime.fetcher.calls.count("img/down") == retries + 1
    assert runtime.dead_letters.records[0][2].attempts == retries + 1


def test_dead_letter_outage_retries_the_whole_batch(runtime):
    runtime.dead_letters.fail_times = 1
    runtime.fetcher.script["img/404"] = FetchError("not_found", "HTTP 404")
    result = run_task(up("a"), up("gone", image="img/404"))
    assert result["indexed"] == ["a"]
    assert result["dead_lettered"] == [{"item_id": "gone", "reason": "not_found"}]
    assert len(runtime.dead_letters.records) == 1 and live(runtime) == {"a": 1}


def test_apply_batch_raises_when_dead_letters_cannot_be_published(runtime):
    runtime.dead_letters.fail_times = 99
    runtime.fetcher.script["img/404"] = FetchError("not_found", "HTTP 404")
    with pytest.raises(DeadLetterUnavailable):
        apply_batch(sourced(up("gone", image="img/404")), runtime)


def test_non_final_attempt_returns_transient_events_for_retry(runtime):
    runtime.fetcher.script["img/slow"] = transient("timeout")
    batch = sourced(up("slow"), up("a"))
    out = apply_batch(batch, runtime, final_attempt=False)
    assert out.retry == [batch[0]] and out.retry_reasons == ["timeout"] and out.indexed == ["a"]


def test_task_settings_are_read_when_it_runs_not_at_import():
    from workers.tasks import apply_catalog_events as task

    assert task.max_retries == 3  # Celery's default: the task reads its worker's settings when it runs


def test_worker_builds_the_hnsw_graph_every_n_writes(tmp_path, monkeypatch):
    """Edge has no background optimizer: the worker optimizes after ``optimize_every`` writes
    (deletes count too). A tiny index stays below Edge's indexing threshold, so count the calls."""
    rt = scripted_runtime(tmp_path, dict(SCRIPT), optimize_every=3)
    try:
        index = serving_index(rt)
        calls = []
        real = index.optimize
        monkeypatch.setattr(index, "optimize", lambda: calls.append(1) or real())
        apply_batch(sourced(up("a"), up("b")), rt)
        assert calls == [] and rt.writes_since_optimize == 2
        apply_batch(sourced(up("c"), gone("a", 2)), rt)
        assert calls == [1] and rt.writes_since_optimize == 0
        assert index.count() == 2  # b and c live; a is a tombstone
    finally:
        rt.close()


@pytest.mark.parametrize(("pool", "concurrency", "helper"), [("solo", 1, True), ("threads", 2, False)])
def test_concurrent_tasks_prepare_their_pictures_inline(tmp_path, pool, concurrency, helper):
    """One task at a time: the next chunk's pictures are fetched on a helper thread while the model
    runs; several at once (threads pool): on the task's own thread, the others keep the cores busy."""
    rt = scripted_runtime(tmp_path, dict(SCRIPT), pool=pool, concurrency=concurrency)
    try:
        threads = set()
        real = rt.fetcher.fetch

        def fetch(ref):
            threads.add(threading.current_thread().name)
            return real(ref)

        rt.fetcher.fetch = fetch
        out = apply_batch(sourced(up("a"), up("b")), rt)
        assert sorted(out.indexed) == ["a", "b"]
        assert all(name.startswith("ingest-prepare") for name in threads) is helper
        assert (threads == {threading.current_thread().name}) is not helper
    finally:
        rt.close()


def test_warm_up_runs_full_batches_as_many_at_once_as_the_tasks(tmp_path):
    """Before the first task: as many full batches at once as the worker has model runs (a barrier
    that fails unless two runs are inside the model together), twice."""
    rt = scripted_runtime(tmp_path, dict(SCRIPT), pool="threads", concurrency=2, ingest_batch_size=8)
    try:
        embedder = rt.load("thumbnail")
        seen = []
        both_inside = threading.Barrier(2, timeout=10)
        real = embedder.embed_catalog

        def embed(images, batch_size=32):
            seen.append((len(images), batch_size))
            both_inside.wait()
            return real(images, batch_size)

        embedder.embed_catalog = embed
        assert worker_runtime.warm_up(rt) > 0
        assert seen == [(8, 8)] * 4
    finally:
        rt.close()


def test_decode_failures_of_the_message_are_dead_lettered_not_raised(runtime):
    sourced_events, rejected = decode_task([{"nonsense": 1}])
    out = apply_batch(sourced_events, runtime, rejected=rejected)
    assert out.dead_lettered == [{"item_id": "", "reason": "invalid_event"}]
    assert np.isfinite(len(runtime.dead_letters.records))
