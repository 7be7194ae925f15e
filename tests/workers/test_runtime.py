"""The worker's runtime: layouts it refuses, how it shares the cores, the Celery app it builds, and
that it writes to every generation the state names (a building one included), fetching once."""

from __future__ import annotations

import pytest

from index.generations import GenerationManager
from index.settings import EdgeIndexSettings, QdrantIndexSettings
from tests.workers.workers_testlib import image_bytes, scripted_runtime, sourced, up
from vision.settings import RuntimeSettings
from workers.batch import apply_batch
from workers.cpu import model_runs_at_once, shared_cores
from workers.runtime import check_layout
from workers.settings import WorkerSettings


def test_embedded_index_refuses_multi_process_pools():
    edge, qdrant = EdgeIndexSettings(), QdrantIndexSettings(url=":memory:")
    for pool, n in (("solo", 1), ("threads", 8), ("prefork", 1)):
        check_layout(edge, WorkerSettings(), pool, n)
    check_layout(qdrant, WorkerSettings(), "prefork", 8)
    with pytest.raises(RuntimeError, match="one process"):
        check_layout(edge, WorkerSettings(), "prefork", 4)
    with pytest.raises(RuntimeError, match="ingest_processes"):
        check_layout(qdrant, WorkerSettings(ingest_processes=2), "prefork", 2)


def test_worker_shares_the_cores_between_its_model_runs(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    rs = RuntimeSettings()
    assert shared_cores(rs, model_runs_at_once(1, 1)).ort_threads == 0  # one run: ORT's default
    assert shared_cores(rs, model_runs_at_once(1, 2)).ort_threads == 4  # two streams
    assert shared_cores(rs, model_runs_at_once(2, 1)).ort_threads == 4  # two tasks (threads pool)
    assert shared_cores(rs, model_runs_at_once(2, 2)).ort_threads == 2
    assert shared_cores(rs, model_runs_at_once(16, 1)).ort_threads == 1  # never below one thread
    assert shared_cores(RuntimeSettings(ort_threads=3), 2).ort_threads == 3  # explicit wins
    assert WorkerSettings(pool="threads", concurrency=2).tasks_at_once == 2
    assert WorkerSettings(pool="solo", concurrency=2).tasks_at_once == 1
    assert WorkerSettings(pool="prefork", concurrency=4).tasks_at_once == 4  # a child each


def test_worker_leaves_the_cores_to_its_model_runs():
    """``limit_blas_threads`` (``build_runtime`` calls it) caps BLAS at one thread: OpenBLAS's pool
    spins after each of the twin check's tiny matrix products, on the cores ONNX Runtime is using."""
    import numpy as np
    from threadpoolctl import threadpool_info

    from workers.cpu import limit_blas_threads

    np.ones((64, 64)) @ np.ones((64, 64))  # BLAS loaded
    limiter = limit_blas_threads()
    try:
        blas = [lib for lib in threadpool_info() if lib["user_api"] == "blas"]
        assert blas and all(lib["num_threads"] == 1 for lib in blas)
    finally:
        limiter.restore_original_limits()


def test_celery_app_reserves_the_next_task_per_slot_and_stores_outcomes_only():
    """Each task slot reserves a second message (it used to fetch the next one from Redis only
    after the ack: 13-14 ms per task), and results hold the outcome, not the task's events."""
    from workers.celery_app import celery_config, create_app
    from workers.settings import CelerySettings

    app = create_app(celery_config(CelerySettings(), WorkerSettings()), tasks=False)
    assert app.conf.worker_prefetch_multiplier == 2
    assert app.conf.result_extended is False
    assert app.conf.task_acks_late is True  # reserved messages go back to the queue if the worker dies
    conf = celery_config(CelerySettings(), WorkerSettings(prefetch_multiplier=1))
    assert conf["worker_prefetch_multiplier"] == 1
    with pytest.raises(ValueError):
        WorkerSettings(prefetch_multiplier=0)


def test_the_app_reads_its_settings_when_first_needed_not_when_built():
    from workers.celery_app import create_app
    from workers.settings import CelerySettings

    calls = []

    def config():
        calls.append(1)
        return {"broker_url": CelerySettings(broker_url="redis://127.0.0.1:6379/7").broker_url}

    app = create_app(config, tasks=False)
    assert calls == []
    assert app.conf.broker_url == "redis://127.0.0.1:6379/7" and calls == [1]


def two_models(rt):
    """The runtime's embedding answers for a second model (its vectors reversed), as a re-embed's."""
    thumb = rt.load("thumbnail")
    other = _Renamed(thumb, "thumbnail-reversed@0", flip=True)
    rt.embedding.load = lambda m: other if m.model_id == other.model_id else thumb
    return thumb, other


def test_events_reach_the_building_generation_fetched_once(tmp_path):
    """During a re-embed, a batch goes to the serving and the building generation: each picture is
    fetched and decoded once and embedded once per target model, into that model's own index."""
    pictures = {f"img/{i}": image_bytes((30 * n, 90, 200 - 30 * n)) for n, i in enumerate("abc")}
    rt = scripted_runtime(tmp_path, pictures)
    try:
        thumb, other = two_models(rt)
        GenerationManager(rt.manager.settings).begin(other.model_id, name="reversed", dim=192)
        out = apply_batch(sourced(up("a"), up("b"), up("c")), rt)
        assert sorted(out.indexed) == ["a", "b", "c"]
        assert sorted(rt.fetcher.calls) == ["img/a", "img/b", "img/c"]  # once each, for both models
        serving, building = rt.targets.current()
        assert (serving.role, building.role, building.model_id) == ("serving", "building", other.model_id)
        for target, model in ((serving, thumb), (building, other)):
            rec, = target.index.retrieve(["b"], with_vectors=True)
            assert rec.payload["model_id"] == model.model_id
            import io

            from PIL import Image

            want = model.embed_catalog([Image.open(io.BytesIO(pictures["img/b"]))])[0]
            assert abs(float(rec.vector @ want) - 1.0) < 1e-5
    finally:
        rt.close()


def test_a_required_target_that_fails_fails_the_batch(tmp_path):
    from workers.pipeline import TargetWriteError

    rt = scripted_runtime(tmp_path, {"img/a": image_bytes()})
    try:
        _, other = two_models(rt)
        GenerationManager(rt.manager.settings).begin(other.model_id, name="reversed", dim=192)
        building = rt.targets.current()[1]

        def broken(points):
            raise OSError("disk full")

        building.index.shared.upsert = broken
        with pytest.raises(TargetWriteError, match="building generation"):
            apply_batch(sourced(up("a")), rt)  # the task retries it (workers.tasks.BATCH_TRANSIENT)
    finally:
        rt.close()


def test_a_failing_optional_target_is_counted_and_the_batch_goes_on(tmp_path):
    from prometheus_client import REGISTRY

    pictures = {f"img/{i}": image_bytes((30 * n, 90, 200 - 30 * n)) for n, i in enumerate("ab")}
    rt = scripted_runtime(tmp_path, pictures)
    try:
        _, other = two_models(rt)
        mgr = GenerationManager(rt.manager.settings)
        mgr.begin(other.model_id, name="reversed", dim=192)
        mgr.switch(other.model_id)
        mgr.switch(rt.manager.state().previous)  # a rollback: the other generation is kept as previous
        targets = rt.targets.current()
        serving = targets[0]
        assert [(t.role, t.required) for t in targets] == [("serving", True), ("previous", False)]

        def broken(points):
            raise OSError("disk full")

        targets[1].index.shared.upsert = broken
        before = REGISTRY.get_sample_value("tongkuan_ingest_target_write_failures_total", {"role": "previous"}) or 0
        out = apply_batch(sourced(up("a"), up("b")), rt)
        assert sorted(out.indexed) == ["a", "b"] and serving.index.count() == 2
        after = REGISTRY.get_sample_value("tongkuan_ingest_target_write_failures_total", {"role": "previous"})
        assert after == before + 1
    finally:
        rt.close()


class _Renamed:
    def __init__(self, inner, model_id, flip=False):
        self.inner, self.model_id, self.dim, self.flip = inner, model_id, inner.dim, flip

    def embed_catalog(self, images, batch_size=32):
        v = self.inner.embed_catalog(images, batch_size)
        return v[:, ::-1].copy() if self.flip else v
