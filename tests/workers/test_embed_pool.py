"""Embedding processes (``workers.embed_pool``): the same ingest result as on the worker's own
threads, per-item failures kept, a dead child turned into a retryable error and replaced, children
that do not outlive the worker, several target models from one fetch, and no mixing of two models'
vectors."""

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
from index.targets import ModelRef
from vision.settings import RuntimeSettings
from vision.thumbnail import ThumbnailEmbedder
from workers.embed_pool import EmbedPool, EmbedPoolBroken
from workers.embedding import LocalEmbedding, ModelMismatch
from workers.fetch import FetchSettings, ImageFetcher
from workers.pipeline import ingest, single_target

THUMB = ModelRef("thumbnail", ThumbnailEmbedder.model_id)

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


def make_pool(objects: Path, processes: int = 2, kind: str = "thumbnail") -> EmbedPool:
    return EmbedPool(processes, kind=kind, runtime=RuntimeSettings(), fetch=FetchSettings().reading_files_under(objects),
                     max_bytes=20 * 1024 * 1024, max_pixels=1_000_000, batch_size=4)


@pytest.fixture
def pool(tmp_path):
    p = make_pool(tmp_path / "objects")
    yield p
    p.close()


def _ingest(items, index, embedding):
    return ingest(items, targets=single_target(index, ThumbnailEmbedder(), "thumbnail"), embedding=embedding,
                  batch_size=4)


def _local(objects):
    return LocalEmbedding.single(ThumbnailEmbedder(), ImageFetcher(object_root=objects, local_refs=True),
                                 max_pixels=1_000_000,
                                 batch_size=4)


def test_pool_ingests_exactly_what_the_worker_threads_do(tmp_path, pool):
    objects = tmp_path / "objects"
    objects.mkdir()
    items = _pictures(objects)
    here = EdgeIndex(tmp_path / "here", ThumbnailEmbedder.dim, model_id=ThumbnailEmbedder.model_id)
    there = EdgeIndex(tmp_path / "there", ThumbnailEmbedder.dim, model_id=ThumbnailEmbedder.model_id)
    try:
        a = _ingest(items, here, _local(objects))
        b = _ingest(items, there, pool)
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
    index = EdgeIndex(tmp_path / "ix", ThumbnailEmbedder.dim, model_id=ThumbnailEmbedder.model_id)
    try:
        pool.warm_up([THUMB], rounds=1)
        victim = pool.pids()[0]
        os.kill(victim, signal.SIGKILL)
        with pytest.raises(EmbedPoolBroken):
            _ingest(items, index, pool)
        assert index.count() == 0  # nothing half-written: the batch is retried whole
        rep = _ingest(items, index, pool)
        assert len(rep.indexed) == 6 and pool.restarts == 1
        assert victim not in pool.pids()
    finally:
        index.close()


def test_children_exit_when_the_worker_process_is_killed(tmp_path):
    script = f"""
import sys, time
sys.path.insert(0, {str(REPO)!r})
from pathlib import Path
from index.targets import ModelRef
from vision.settings import RuntimeSettings
from vision.thumbnail import ThumbnailEmbedder
from workers.embed_pool import EmbedPool
from workers.fetch import FetchSettings
pool = EmbedPool(2, kind="thumbnail", runtime=RuntimeSettings(), fetch=FetchSettings().reading_files_under(Path({str(tmp_path)!r})),
                 max_bytes=1000000, max_pixels=1000000, batch_size=2)
pool.warm_up([ModelRef("thumbnail", ThumbnailEmbedder.model_id)], rounds=1)
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
    pool = make_pool(tmp_path, processes=1)
    try:
        with pytest.raises(ModelMismatch, match=f"runs {ThumbnailEmbedder.model_id} for 'thumbnail'; its generation is other@1"):
            pool.warm_up([ModelRef("thumbnail", "other@1")], rounds=1)
    finally:
        pool.close()


def test_one_fetch_feeds_every_target_model(tmp_path):
    """A re-embed's two generations from the pool: each chunk fetched once in a child, embedded with
    both models there, and each vector the one that model gives in this process."""
    from vision.registry import ModelRegistry
    from vision.runtime import VisionPipeline

    objects = tmp_path / "objects"
    objects.mkdir()
    items = _pictures(objects)[:5]
    registry = ModelRegistry(RuntimeSettings().model_dir)
    names = [registry.active, "lite0-imagenet"]
    models = [ModelRef(n, registry.get(n).model_id) for n in names]
    pool = make_pool(objects, processes=1, kind="onnx")
    try:
        (ready, vectors, failures, _), = pool.embed_chunks([items], models)
    finally:
        pool.close()
    assert len(ready) == 5 and failures == [] and set(vectors) == {m.model_id for m in models}
    images = [Image.open(objects / it.image).convert("RGB") for it in items]
    for name, model in zip(names, models, strict=True):
        here = VisionPipeline.from_settings(RuntimeSettings(model=name)).embed_catalog(images, batch_size=4)
        np.testing.assert_allclose(vectors[model.model_id], here, atol=1e-4)
