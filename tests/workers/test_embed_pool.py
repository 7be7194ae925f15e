"""Embedding processes (``workers.embed_pool``): the same ingest result as on the worker's own
threads, per-item failures kept, a dead child turned into a retryable error and replaced, children
that do not outlive the worker, and no mixing of two models' vectors."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from events.item import CatalogItem
from index.edge import EdgeIndex
from tongkuan.drill import FAST_EMBEDDER_REF, FastEmbedder
from tongkuan.settings import Settings
from workers.embed_pool import EmbedPool, EmbedPoolBroken, PooledEmbedder
from workers.fetch import ImageFetcher
from workers.pipeline import ingest_items

REPO = Path(__file__).resolve().parents[2]


def _pictures(root: Path) -> list[CatalogItem]:
    """Distinct pictures, an exact copy, and bad ones among them."""
    rng = np.random.default_rng(1)
    items = []
    for i in range(9):
        path = root / f"p{i}.jpg"
        Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(path, quality=90)
        items.append(CatalogItem(item_id=f"item-{i}", title=f"i {i}", category_path=("Bags",), image=path.name))
    (root / "copy.jpg").write_bytes((root / "p3.jpg").read_bytes())
    (root / "noise.jpg").write_bytes(b"not a picture" * 20)
    full = io.BytesIO()
    Image.new("RGB", (200, 200), (9, 9, 9)).save(full, "JPEG")
    (root / "trunc.jpg").write_bytes(full.getvalue()[: len(full.getvalue()) // 2])
    Image.new("RGB", (1500, 1500), (0, 0, 0)).save(root / "huge.png")
    for name, ref in [("copy", "copy.jpg"), ("noise", "noise.jpg"), ("trunc", "trunc.jpg"), ("missing", "nope.jpg"),
                      ("huge", "huge.png")]:
        items.append(CatalogItem(item_id=f"item-{name}", title=name, category_path=("Bags",), image=ref))
    return items


@pytest.fixture
def pool(tmp_path):
    settings = Settings(object_root=tmp_path / "objects", data_dir=tmp_path / "data")
    p = EmbedPool(settings, 2, FAST_EMBEDDER_REF, FastEmbedder.model_id)
    yield p
    p.close()


def _ingest(items, index, embedder, objects):
    return ingest_items(items, index=index, embedder=embedder, fetcher=ImageFetcher(object_root=objects),
                        max_pixels=1_000_000, batch_size=4)


def test_pool_ingests_exactly_what_the_worker_threads_do(tmp_path, pool):
    objects = tmp_path / "objects"
    objects.mkdir()
    items = _pictures(objects)
    here = EdgeIndex(tmp_path / "here", FastEmbedder.dim, model_id=FastEmbedder.model_id)
    there = EdgeIndex(tmp_path / "there", FastEmbedder.dim, model_id=FastEmbedder.model_id)
    try:
        a = _ingest(items, here, FastEmbedder(), objects)
        pooled = PooledEmbedder(FastEmbedder(), pool)
        b = _ingest(items, there, pooled, objects)
        assert sorted(b.indexed) == sorted(a.indexed) and len(b.indexed) == 10  # 9 pictures + the copy
        reasons = {f.item_id: f.reason for f in b.failures}
        assert reasons == {f.item_id: f.reason for f in a.failures} == {
            "item-noise": "unsupported", "item-trunc": "corrupt", "item-missing": "missing",
            "item-huge": "too_many_pixels"}
        assert b.duplicates == a.duplicates == {"item-copy": "item-3"}
        assert {"fetch", "decode", "hash", "embed"} <= set(b.stage_seconds)  # the children's stages
        ids = sorted(b.indexed)
        va = {r.item_id: r for r in here.retrieve(ids, with_vectors=True)}
        vb = {r.item_id: r for r in there.retrieve(ids, with_vectors=True)}
        for i in ids:
            np.testing.assert_allclose(vb[i].vector, va[i].vector, atol=1e-6)
            assert vb[i].payload["md5"] == va[i].payload["md5"] and vb[i].payload["dhash"] == va[i].payload["dhash"]
        assert len(pool.pids()) == 2
    finally:
        here.close()
        there.close()


def test_a_dead_child_fails_the_call_retryably_and_the_next_call_gets_fresh_children(tmp_path, pool):
    objects = tmp_path / "objects"
    objects.mkdir()
    items = _pictures(objects)[:6]
    index = EdgeIndex(tmp_path / "ix", FastEmbedder.dim, model_id=FastEmbedder.model_id)
    try:
        pooled = PooledEmbedder(FastEmbedder(), pool)
        pool.warm_up(batch=4, rounds=1)
        victim = pool.pids()[0]
        os.kill(victim, signal.SIGKILL)
        with pytest.raises(EmbedPoolBroken):
            _ingest(items, index, pooled, objects)
        assert index.count() == 0  # nothing half-written: the batch is retried whole
        rep = _ingest(items, index, pooled, objects)
        assert len(rep.indexed) == 6 and pool.restarts == 1
        assert victim not in pool.pids()
    finally:
        index.close()


def test_children_exit_when_the_worker_process_is_killed(tmp_path):
    script = f"""
import sys, time
sys.path.insert(0, {str(REPO)!r})
from tongkuan.drill import FAST_EMBEDDER_REF, FastEmbedder
from tongkuan.settings import Settings
from workers.embed_pool import EmbedPool
pool = EmbedPool(Settings(data_dir={str(tmp_path)!r}), 2, FAST_EMBEDDER_REF, FastEmbedder.model_id)
pool.warm_up(batch=2, rounds=1)
print(*pool.pids(), flush=True)
time.sleep(120)
"""
    with subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) as proc:
        try:
            children = [int(x) for x in proc.stdout.readline().split()]
            assert len(children) == 2 and all(_alive(c) for c in children)
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            deadline = time.monotonic() + 10
            while any(_alive(c) for c in children) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert not any(_alive(c) for c in children)
        finally:
            proc.kill()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"  # a zombie has exited (its parent, killed, reaps nothing)


def test_a_child_on_another_model_is_refused(tmp_path):
    settings = Settings(data_dir=tmp_path)
    with pytest.raises(ValueError, match="pool for"):
        PooledEmbedder(FastEmbedder(), EmbedPool(settings, 1, FAST_EMBEDDER_REF, "other@1"))
    pool = EmbedPool(settings, 1, FAST_EMBEDDER_REF, "other@1")
    try:
        with pytest.raises(RuntimeError, match="runs drill-fast@0, the worker writes other@1"):
            pool.warm_up(batch=2, rounds=1)
    finally:
        pool.close()


def test_prefork_workers_cannot_have_embedding_processes(monkeypatch):
    from tongkuan.settings import get_settings
    from workers.tasks import check_worker_pool

    monkeypatch.setenv("TONGKUAN_INGEST_PROCESSES", "2")
    get_settings.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="ingest_processes needs worker_pool=solo or threads"):
            check_worker_pool("prefork", 1)
        check_worker_pool("thread", 2)  # fine
    finally:
        monkeypatch.delenv("TONGKUAN_INGEST_PROCESSES")
        get_settings.cache_clear()
