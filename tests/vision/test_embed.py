from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
import torch

from offline.training.backbone import LiteBackbone
from vision.preprocess import Preprocess, preprocess


def test_torch_and_onnx_agree_on_real_images(pipeline, real_images):
    entry = pipeline.entry
    with contextlib.redirect_stdout(io.StringIO()):
        model = LiteBackbone(pooling=entry.pooling["type"], gem_p=entry.pooling.get("p", 3.0))
    x = preprocess(real_images, entry.preprocessing)
    with torch.no_grad():
        ref_f, ref = (t.numpy() for t in model(torch.from_numpy(x)))
    got_f, got = pipeline.embedder.run(x)
    cos = (ref * got).sum(axis=1)
    assert cos.min() >= 0.999, cos
    assert np.allclose(ref_f, got_f, atol=1e-3 * np.abs(ref_f).max())


def test_embeddings_unit_norm_and_batch_equals_single(pipeline, real_images):
    batch = pipeline.embed_catalog(real_images, batch_size=4)
    assert batch.shape == (len(real_images), pipeline.dim) and batch.dtype == np.float32
    assert np.allclose(np.linalg.norm(batch, axis=1), 1.0, atol=1e-5)
    singles = np.stack([pipeline.embed_catalog([im])[0] for im in real_images[:3]])
    assert np.allclose(batch[:3], singles, atol=1e-5)


def test_query_embedding(pipeline, real_images):
    q = pipeline.embed_query(real_images[0], max_regions=3)
    assert 1 <= len(q.regions) <= 3 and q.vectors.shape == (len(q.regions), pipeline.dim)
    assert np.allclose(np.linalg.norm(q.vectors, axis=1), 1.0, atol=1e-5)
    assert q.model_id == pipeline.model_id
    assert set(pipeline.timings) == {"localize", "embed"}
    one = pipeline.embed_query(real_images[0], max_regions=1)
    assert one.vectors.shape == (1, pipeline.dim)
    assert np.allclose(one.vectors[0], q.vectors[0], atol=1e-5)
    assert one.regions[0] == q.regions[0]


def test_empty_catalog_batch(pipeline):
    assert pipeline.embed_catalog([]).shape == (0, pipeline.dim)


def test_preprocess_shapes_and_range(real_images):
    x = preprocess(real_images[:2], Preprocess(input_size=256))
    assert x.shape == (2, 3, 256, 256) and x.dtype == np.float32
    assert -1.0 <= x.min() and x.max() <= 1.0
    with pytest.raises(ValueError):
        Preprocess(input_size=250)
    cc = preprocess(real_images[0], Preprocess(input_size=224, resize="center_crop"))
    assert cc.shape == (1, 3, 224, 224)


def test_stage_timer_is_per_thread():
    import threading

    from vision.runtime import StageTimer

    t = StageTimer()
    with t.stage("embed"):
        pass
    seen = {}

    def other():
        seen["before"] = dict(t.last)
        with t.stage("localize"):
            pass
        seen["after"] = dict(t.last)

    th = threading.Thread(target=other)
    th.start()
    th.join()
    assert seen["before"] == {} and set(seen["after"]) == {"localize"}
    assert set(t.last) == {"embed"} and t.counts == {"embed": 1, "localize": 1}


def test_catalog_tensors_split_the_catalog_embedding_exactly(model_dir, pipeline, real_images):
    """The shipped (uncropped) model: pre-processing + the model run as two steps gives the same
    vectors as ``embed_images`` and ``embed_catalog``; a cropping entry (the ImageNet model crops
    catalog images with the model's own feature map) offers no tensors."""
    from vision.registry import ModelRegistry
    from vision.runtime import VisionPipeline
    from vision.settings import RuntimeSettings

    shipped = VisionPipeline.from_settings(
        RuntimeSettings(model_dir=model_dir, model=ModelRegistry(model_dir).active, ort_threads=2))
    assert shipped.entry.crop.catalog == "none"
    images = real_images * 2
    reference = shipped.embed_images(images)
    split = shipped.embed_catalog_tensors(shipped.catalog_tensors(images))
    catalog = shipped.embed_catalog(images, batch_size=3)
    np.testing.assert_allclose(split, reference, atol=1e-5)
    np.testing.assert_allclose(catalog, reference, atol=1e-5)
    assert pipeline.entry.crop.catalog != "none" and pipeline.catalog_tensors(images) is None
