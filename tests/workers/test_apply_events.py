"""The batch task logic on the real embedded index (EdgeIndex), with a fake embedder, a scripted
fetcher and a recording dead-letter publisher. Celery runs eagerly (``Task.apply``) where retries
matter."""

from __future__ import annotations

import time

import pytest
from prometheus_client import REGISTRY

from events.models import ItemDeleted, ItemFeaturesUpdated, ItemUpserted
from index.edge import EdgeIndex
from tests.workers.workers_testlib import (
    JPEG,
    PNG,
    FakeEmbedder,
    RecordingDeadLetters,
    ScriptedFetcher,
    image_bytes,
    transient,
)
from tongkuan.settings import Settings
from workers import tasks
from workers.celery_app import check_pool
from workers.fetch import FetchError
from workers.tasks import DeadLetterUnavailable, WorkerRuntime, apply_catalog_events, apply_events

RED, BLUE, GREEN = image_bytes((220, 20, 20)), image_bytes((20, 20, 220)), image_bytes((20, 200, 20))


def up(item_id: str, version: int = 1, image: str | None = None, cat=("Shoes", "Sneakers"), **kw) -> dict:
    return ItemUpserted(item_id=item_id, version=version, title=f"title {item_id}", category_path=cat,
                        images=(image or f"img/{item_id}",), **kw).model_dump(mode="json")


def delete(item_id: str, version: int) -> dict:
    return ItemDeleted(item_id=item_id, version=version).model_dump(mode="json")


@pytest.fixture
def runtime(tmp_path):
    fetcher = ScriptedFetcher({"img/a": RED, "img/b": BLUE, "img/c": GREEN, "img/j": JPEG, "img/p": PNG})
    rt = WorkerRuntime(settings=Settings(data_dir=tmp_path), embedder=FakeEmbedder(),
                       index=EdgeIndex(tmp_path / "index", FakeEmbedder.dim, model_id=FakeEmbedder.model_id),
                       fetcher=fetcher, dead_letters=RecordingDeadLetters(), dlq_topic="catalog.items.dlq")
    previous = tasks.set_runtime(rt)
    yield rt
    tasks.set_runtime(previous)
    rt.close()


def run_task(events: list[dict]) -> dict:
    """Through Celery, eagerly (retries included)."""
    res = apply_catalog_events.apply(args=[events])
    assert res.successful(), res.traceback
    return res.get()


def live(rt: WorkerRuntime) -> dict[str, int]:
    ids = rt.fetcher.script.keys()
    return {r.item_id: r.version for r in rt.index.retrieve([i.removeprefix("img/") for i in ids])}


def sample(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_upserts_are_indexed_with_the_result_shape(runtime):
    before = sample("tongkuan_ingest_event_to_searchable_seconds_count", op="upsert")
    result = run_task([up("a"), up("b", 2), up("c", 3, event_time=time.time() - 2)])
    assert set(result) == {"indexed", "deleted", "stale", "dead_lettered", "features"}
    assert sorted(result["indexed"]) == ["a", "b", "c"]
    assert result["deleted"] == result["stale"] == result["dead_lettered"] == result["features"] == []
    assert live(runtime) == {"a": 1, "b": 2, "c": 3}
    assert sample("tongkuan_ingest_event_to_searchable_seconds_count", op="upsert") == before + 3
    rec = runtime.index.retrieve(["c"])[0]
    assert rec.payload["title"] == "title c" and rec.shard == "Shoes"


def test_redelivery_is_harmless(runtime):
    batch = [up("a", 4), up("b", 4)]
    first, second = run_task(batch), run_task(batch)
    assert sorted(first["indexed"]) == sorted(second["indexed"]) == ["a", "b"]
    assert runtime.index.count() == 2 and live(runtime) == {"a": 4, "b": 4}


def test_deletes_and_stale_versions(runtime):
    run_task([up("a", 1), up("b", 5)])
    result = run_task([delete("a", 2), up("b", 3)])
    assert result["deleted"] == ["a"] and result["stale"] == ["b"]
    # A late create older than the delete's tombstone does not resurrect the item.
    late = run_task([up("a", 1), delete("b", 4)])
    assert sorted(late["stale"]) == ["a", "b"]
    assert live(runtime) == {"b": 5}


def test_highest_version_in_a_batch_wins_and_delete_wins_a_tie(runtime):
    result = run_task([up("a", 1), up("a", 3, image="img/b"), delete("a", 2), up("c", 7), delete("c", 7)])
    assert result["indexed"] == ["a"] and result["deleted"] == ["c"]
    assert runtime.index.retrieve(["a"])[0].payload["image"] == "img/b"
    assert live(runtime) == {"a": 3}


def test_features_are_passed_through_not_stored(runtime):
    ev = ItemFeaturesUpdated(item_id="a", counters={"clicks": 3, "orders": 1, "rating": 4.5})
    result = run_task([ev.model_dump(mode="json"), up("b")])
    assert result["features"] == [ev.model_dump(mode="json")]
    assert result["indexed"] == ["b"] and live(runtime) == {"b": 1}


def test_permanent_failures_are_dead_lettered_with_reason_and_the_rest_goes_on(runtime):
    runtime.fetcher.script.update({
        "img/404": FetchError("not_found", "HTTP 404"),
        "img/big": FetchError("too_large", "Content-Length 9e9"),
        "img/ssrf": FetchError("private_address", "10.0.0.1"),
        "img/junk": b"this is not an image at all",
        "img/trunc": JPEG[: len(JPEG) // 2],
    })
    bad_schema = {**up("v2"), "schema_version": 2}
    missing_title = {k: v for k, v in up("nt").items() if k != "title"}
    events = [up("a"), up("x404", image="img/404"), up("xbig", image="img/big"),
              up("xssrf", image="img/ssrf"), up("xjunk", image="img/junk"),
              up("xtrunc", image="img/trunc"), bad_schema, missing_title, "not even a dict", up("b")]
    before = sample("tongkuan_dlq_events_total", reason="not_found")
    result = run_task(events)
    assert sorted(result["indexed"]) == ["a", "b"]
    got = {d["item_id"]: d["reason"] for d in result["dead_lettered"]}
    assert got == {"x404": "not_found", "xbig": "too_large", "xssrf": "private_address",
                   "xjunk": "unsupported", "xtrunc": "corrupt", "v2": "unknown_schema_version",
                   "nt": "invalid_event", "": "invalid_event"}
    recs = runtime.dead_letters.records
    assert len(recs) == 8 and all(topic == "catalog.items.dlq" for topic, *_ in recs)
    by_key = {key: value for _, key, value, _ in recs}
    assert by_key[b"x404"]["event"] == up("x404", image="img/404") | {"event_time": by_key[b"x404"]["event"]["event_time"]}
    assert by_key[b"x404"]["reason"] == "not_found" and "404" in by_key[b"x404"]["detail"]
    assert by_key[b"v2"]["event"]["schema_version"] == 2
    assert all(("reason", v["reason"].encode()) in h for _, _, v, h in recs)
    assert runtime.dead_letters.flushes == 1
    assert sample("tongkuan_dlq_events_total", reason="not_found") == before + 1


def test_transient_failures_retry_only_those_items_and_results_accumulate(runtime):
    runtime.fetcher.script["img/flaky"] = [transient("timeout"), transient("http_unavailable"), RED]
    result = run_task([up("a"), up("flaky"), up("b")])
    assert sorted(result["indexed"]) == ["a", "b", "flaky"]
    assert result["dead_lettered"] == []
    # a and b were fetched once; flaky three times (two retries of a one-event batch).
    assert runtime.fetcher.calls.count("img/a") == 1 and runtime.fetcher.calls.count("img/flaky") == 3


def test_transient_failures_are_dead_lettered_after_max_retries(runtime):
    from workers.celery_app import get_worker_settings

    runtime.fetcher.script["img/down"] = [transient("connection")]
    result = run_task([up("down"), up("a")])
    assert result["indexed"] == ["a"]
    assert result["dead_lettered"] == [{"item_id": "down", "reason": "connection"}]
    assert runtime.fetcher.calls.count("img/down") == get_worker_settings().task_max_retries + 1
    assert runtime.dead_letters.records[0][2]["attempts"] == get_worker_settings().task_max_retries + 1


def test_dead_letter_outage_retries_the_whole_batch(runtime):
    runtime.dead_letters.fail_times = 1
    runtime.fetcher.script["img/404"] = FetchError("not_found", "HTTP 404")
    result = run_task([up("a"), up("gone", image="img/404")])
    assert result["indexed"] == ["a"]
    assert result["dead_lettered"] == [{"item_id": "gone", "reason": "not_found"}]
    assert len(runtime.dead_letters.records) == 1 and live(runtime) == {"a": 1}


def test_apply_events_without_celery_raises_when_dead_letters_cannot_be_published(runtime):
    runtime.dead_letters.fail_times = 99
    runtime.fetcher.script["img/404"] = FetchError("not_found", "HTTP 404")
    with pytest.raises(DeadLetterUnavailable):
        apply_events([up("gone", image="img/404")], runtime)


def test_non_final_attempt_returns_transient_events_for_retry(runtime):
    runtime.fetcher.script["img/slow"] = transient("timeout")
    raw = up("slow")
    out = apply_events([raw, up("a")], runtime, final_attempt=False)
    assert out.retry_events == [raw] and out.retry_reasons == ["timeout"] and out.indexed == ["a"]


def test_embedded_index_refuses_multi_process_pools():
    check_pool("edge", "solo", 1)
    check_pool("edge", "threads", 8)
    check_pool("edge", "prefork", 1)
    check_pool("qdrant", "prefork", 8)
    with pytest.raises(RuntimeError, match="one process"):
        check_pool("edge", "prefork", 4)


def test_worker_builds_the_hnsw_graph_every_n_writes(runtime, monkeypatch):
    """Edge has no background optimizer: the worker optimizes after ``optimize_every`` writes
    (deletes count too). A tiny index stays below Edge's indexing threshold, so count the calls."""
    calls = []
    real = runtime.index.optimize
    monkeypatch.setattr(runtime.index, "optimize", lambda: calls.append(1) or real())
    runtime.optimize_every = 3
    apply_events([up("a"), up("b")], runtime)
    assert calls == [] and runtime.writes_since_optimize == 2
    apply_events([up("c"), delete("a", 2)], runtime)
    assert calls == [1] and runtime.writes_since_optimize == 0
    assert runtime.index.count() == 2  # b and c live; a is a tombstone


def test_worker_shares_the_cores_between_its_model_streams(monkeypatch):
    from tongkuan.settings import Settings
    from workers.tasks import worker_threads

    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert worker_threads(Settings(ingest_streams=1)).ort_threads == 0  # one stream: ORT's default
    assert worker_threads(Settings(ingest_streams=2)).ort_threads == 4
    assert worker_threads(Settings(ingest_streams=16)).ort_threads == 1  # never below one thread
    assert worker_threads(Settings(ingest_streams=2, ort_threads=3)).ort_threads == 3  # explicit wins


def test_threads_pool_tasks_share_the_cores_too(monkeypatch):
    from tongkuan.settings import Settings
    from workers.celery_app import WorkerSettings
    from workers.tasks import tasks_at_once, worker_threads

    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert tasks_at_once(WorkerSettings(worker_pool="threads", worker_concurrency=2)) == 2
    assert tasks_at_once(WorkerSettings(worker_pool="solo", worker_concurrency=2)) == 1
    assert tasks_at_once(WorkerSettings(worker_pool="prefork", worker_concurrency=4)) == 4  # a child each
    assert worker_threads(Settings(), tasks_at_once=2).ort_threads == 4
    assert worker_threads(Settings(ingest_streams=2), tasks_at_once=2).ort_threads == 2
    assert worker_threads(Settings(), tasks_at_once=16).ort_threads == 1
    assert worker_threads(Settings(ort_threads=3), tasks_at_once=2).ort_threads == 3  # explicit wins


def test_worker_leaves_the_cores_to_its_model_runs():
    """``limit_blas_threads`` (``build_runtime`` and ``tongkuan ingest`` call it) caps BLAS at one
    thread: OpenBLAS's pool spins after each of the twin check's tiny matrix products, on the cores
    ONNX Runtime is using."""
    import numpy as np
    from threadpoolctl import threadpool_info

    from workers.tasks import limit_blas_threads

    np.ones((64, 64)) @ np.ones((64, 64))  # BLAS loaded
    limiter = limit_blas_threads()
    try:
        blas = [lib for lib in threadpool_info() if lib["user_api"] == "blas"]
        assert blas and all(lib["num_threads"] == 1 for lib in blas)
    finally:
        limiter.restore_original_limits()


def test_warm_up_runs_full_batches_as_many_at_once_as_the_tasks(runtime):
    """Before the first task: ``tasks_at_once`` full batches at once (a barrier that fails unless
    two runs are inside the model together), twice."""
    import threading

    seen = []
    both_inside = threading.Barrier(2, timeout=10)
    real = runtime.embedder.embed_catalog

    def embed(images, batch_size=32):
        seen.append((len(images), batch_size))
        both_inside.wait()
        return real(images, batch_size)

    runtime.embedder.embed_catalog = embed
    runtime.tasks_at_once = 2
    runtime.settings = Settings(data_dir=runtime.settings.data_dir, ingest_batch_size=8)
    assert tasks.warm_up(runtime) > 0
    assert seen == [(8, 8)] * 4


@pytest.mark.parametrize(("tasks_at_once", "helper"), [(1, True), (2, False)])
def test_concurrent_tasks_prepare_their_pictures_inline(runtime, tasks_at_once, helper):
    """One task at a time: the next chunk's pictures are fetched on a helper thread while the model
    runs; several at once (threads pool): on the task's own thread, the others keep the cores busy."""
    import threading

    threads = set()
    real = runtime.fetcher.fetch

    def fetch(ref):
        threads.add(threading.current_thread().name)
        return real(ref)

    runtime.fetcher.fetch = fetch
    runtime.tasks_at_once = tasks_at_once
    out = apply_events([up("a"), up("b")], runtime)
    assert sorted(out.indexed) == ["a", "b"]
    assert all(name.startswith("ingest-prepare") for name in threads) is helper
    assert (threads == {threading.current_thread().name}) is not helper


def test_celery_app_reserves_the_next_task_per_slot_and_stores_outcomes_only():
    """Each task slot reserves a second message (it used to fetch the next one from Redis only
    after the ack: 13-14 ms per task), and results hold the outcome, not the task's events."""
    from workers.celery_app import WorkerSettings, create_app

    app = create_app(WorkerSettings())
    assert app.conf.worker_prefetch_multiplier == 2
    assert app.conf.result_extended is False
    assert app.conf.task_acks_late is True  # reserved messages go back to the queue if the worker dies
    assert create_app(WorkerSettings(prefetch_multiplier=1)).conf.worker_prefetch_multiplier == 1
    with pytest.raises(ValueError):
        WorkerSettings(prefetch_multiplier=0)
