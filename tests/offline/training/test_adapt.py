"""Training from a shipped model (``offline.training.from_onnx``) and the catalog-only adaptation's
data (``TrainSet(backgrounds=...)``): what ``train --init`` / ``train --adapt CATALOG`` build on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from offline.training.data import TrainSet, load_rgb, read_classes, read_split
from offline.training.from_onnx import OnnxImportError, load_onnx_into
from offline.training.model import EmbeddingNet
from vision.preprocess import Preprocess, preprocess
from vision.registry import ModelRegistry

REPO = Path(__file__).resolve().parents[3]
SHIPPED = "lite0-grocery-v2-s224"


@pytest.fixture(scope="module")
def shipped_onnx() -> Path:
    return ModelRegistry(REPO / "models").resolve(SHIPPED)[1]


def test_the_shipped_onnx_loads_back_into_torch_exactly(shipped_onnx, grocery):
    model = EmbeddingNet(dim=512, n_coarse=43, freeze_blocks=8)
    assert load_onnx_into(model, shipped_onnx) == {"convolutions": 49, "head_tensors": 9}
    photos = [s.path for s in read_split(grocery, "val")[:3]]
    x = preprocess([load_rgb(p) for p in photos], Preprocess(input_size=224))
    sess = ort.InferenceSession(str(shipped_onnx), providers=["CPUExecutionProvider"])
    want = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {sess.get_inputs()[0].name: x}), strict=True))
    model.eval()
    with torch.no_grad():
        feats, emb, coarse = model(torch.from_numpy(x))
    assert float((emb.numpy() * want["embedding"]).sum(1).min()) > 0.99999
    assert np.abs(coarse.numpy() - want["coarse_logits"]).max() < 1e-4
    assert np.abs(feats.numpy() - want["features"]).max() < 1e-3
    # folded BatchNorms never switch to batch statistics, even in training mode
    model.train()
    bns = [m for m in model.net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns) and model.bn.training


def test_an_export_of_another_shape_is_refused(shipped_onnx, tmp_path):
    with pytest.raises(OnnxImportError, match="shape"):
        load_onnx_into(EmbeddingNet(dim=256, n_coarse=43, freeze_blocks=8), shipped_onnx)
    # a graph that is not this architecture (the text encoder): refused by its convolution count
    text = REPO / "models" / "minilm-l6-v2-text.onnx"
    if text.is_file():
        with pytest.raises(OnnxImportError, match="convolutions"):
            load_onnx_into(EmbeddingNet(dim=512, n_coarse=43, freeze_blocks=8), text)
    broken = tmp_path / "broken.onnx"
    m = onnx.load(str(shipped_onnx))
    m.graph.initializer.pop()  # the last convolution's folded bias
    onnx.save(m, str(broken))
    with pytest.raises(OnnxImportError, match="no initializer"):
        load_onnx_into(EmbeddingNet(dim=512, n_coarse=43, freeze_blocks=8), broken)


def test_catalog_only_items_with_backgrounds_of_other_products(grocery):
    classes = [c for c in read_classes(grocery) if c.fine_id in (41, 42)]
    backgrounds = [s for s in read_split(grocery, "train") if s.fine_id in (0, 1)][:6]
    ds = TrainSet([], classes, size=64, p_synth=1.0, preload=False, backgrounds=backgrounds)
    assert len(ds) == 2 and ds.is_iconic.all()  # the new products' catalog images, nothing else
    a, y, _, iconic = ds[(0, 7)]
    b, *_ = ds[(0, 7)]
    assert a.shape == (3, 64, 64) and y == 41 and iconic and torch.equal(a, b)  # seeded: reproducible
    assert ds._bg_cache  # the synthesis pasted it on one of the other products' photos
    assert {backgrounds[j].fine_id for j in ds._bg_cache} <= {0, 1}
    # without photos or backgrounds there is nothing to paste on: a plain crop of the catalog image
    plain = TrainSet([], classes, size=64, p_synth=1.0, preload=False)
    assert plain[(1, 3)][0].shape == (3, 64, 64)
