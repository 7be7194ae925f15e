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


def test_wise_mixes_the_trunk_toward_imagenet_keeps_the_head_and_picks_on_the_trained_classes():
    import argparse
    import contextlib
    import io

    from offline.training.train import wise_ensembles

    with contextlib.redirect_stdout(io.StringIO()):
        model = EmbeddingNet(dim=16, n_coarse=5, freeze_blocks=8)
        imagenet = EmbeddingNet(dim=16, n_coarse=5, freeze_blocks=8).state_dict()
    w = "net._conv_head.weight"
    with torch.no_grad():
        model.net._conv_head.weight.add_(1.0)  # "trained": the trunk moved away from ImageNet
        model.proj.weight.fill_(0.5)          # the head has no pretrained counterpart
    seen = []

    def evaluate():
        shift = float((model.state_dict()[w] - imagenet[w]).mean())  # = α
        seen.append(shift)
        # the trained classes' score peaks at α = 0.6; unseen ones would prefer less: not looked at
        return {"photo2catalog_r1": 1 - abs(shift - 0.6), "photo2catalog_r5": 1.0,
                "unseen": {"photo2catalog_r1": 1 - shift, "photo2photo_r1": 0.0}, "photo2photo_r1": 0.0}

    args = argparse.Namespace(init="", select="p2c")
    best, rows = wise_ensembles(model, [0.0, 0.3, 0.6], evaluate, args)
    assert [r["wise_alpha"] for r in rows] == [0.0, 0.3, 0.6, 1.0]  # the trained weights always compete
    assert seen == pytest.approx([0.0, 0.3, 0.6, 1.0], abs=1e-5)
    assert best["wise_alpha"] == 0.6
    assert float((model.state_dict()[w] - imagenet[w]).mean()) == pytest.approx(0.6, abs=1e-5)  # left at 0.6
    assert torch.all(model.proj.weight == 0.5)
    with pytest.raises(SystemExit, match="ONNX"):
        wise_ensembles(model, [0.5], evaluate, argparse.Namespace(init="models/x.onnx", select="p2c"))
    with pytest.raises(SystemExit, match=r"\[0, 1\]"):
        wise_ensembles(model, [1.5], evaluate, args)


def test_the_trunk_descriptor_concatenation_is_unit_length_and_weighted():
    from offline.training.train import _concat

    e = np.array([[1.0, 0.0], [0.0, 1.0]])
    g = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    x = _concat(e, g, 2.0)
    assert x.shape == (2, 5) and np.allclose(np.linalg.norm(x, axis=1), 1.0)
    assert np.allclose(x[0], np.array([1, 0, 0, 2, 0]) / np.sqrt(5))  # the trunk part weighs w times more


def test_the_trainer_refuses_a_missing_dataset_model_or_export_in_one_line(tmp_path, capsys):
    from offline.training.train import main as train_main

    assert train_main(["--adapt", str(tmp_path / "nowhere"), "--epochs", "1"]) == 2
    assert "nowhere" in capsys.readouterr().err
    assert train_main(["--classes", "0-40", "--init", "no-such-model", "--model-dir", str(REPO / "models"),
                       "--epochs", "0", "--var", str(tmp_path / "var"), "--reports", str(tmp_path)]) == 2
    assert "no-such-model" in capsys.readouterr().err
