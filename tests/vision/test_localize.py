from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from PIL import Image

from vision.localize import (
    FullImageLocalizer,
    OnnxDetectorLocalizer,
    Region,
    SaliencyLocalizer,
    nms,
    regions_from_feature_map,
)

BOXES = np.array(
    [[0.1, 0.1, 0.5, 0.5], [0.12, 0.1, 0.5, 0.52], [0.6, 0.6, 0.9, 0.95], [0.0, 0.0, 0.2, 0.2]], np.float32
)
SCORES = np.array([0.9, 0.8, 0.7, 0.1], np.float32)


def _inside(r: Region, size) -> bool:
    x0, y0, x1, y1 = r.box
    return 0 <= x0 < x1 <= size[0] and 0 <= y0 < y1 <= size[1]


@pytest.fixture(scope="module")
def tiny_detector(tmp_path_factory):
    """A 64x64-input ONNX 'detector' that always outputs BOXES/SCORES (the input feeds a zero term)."""
    zero = helper.make_node("ReduceMean", ["images"], ["m"], keepdims=0)
    mul = helper.make_node("Mul", ["m", "zero"], ["z"])
    boxes = helper.make_node("Add", ["boxes_c", "z"], ["boxes"])
    scores = helper.make_node("Add", ["scores_c", "z"], ["scores"])
    graph = helper.make_graph(
        [zero, mul, boxes, scores],
        "tiny_detector",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 64, 64])],
        [
            helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [1, 4, 4]),
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 4]),
        ],
        initializer=[
            helper.make_tensor("boxes_c", TensorProto.FLOAT, [1, 4, 4], BOXES.ravel().tolist()),
            helper.make_tensor("scores_c", TensorProto.FLOAT, [1, 4], SCORES.tolist()),
            helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = tmp_path_factory.mktemp("det") / "tiny.onnx"
    onnx.save(model, path)
    return path


def test_full_image_localizer():
    regions = FullImageLocalizer().localize(Image.new("RGB", (30, 20)))
    assert regions == [Region((0, 0, 30, 20), 1.0)]


def test_onnx_detector_threshold_nms_order(tiny_detector):
    img = Image.new("RGB", (200, 100))
    regions = OnnxDetectorLocalizer(tiny_detector, score_threshold=0.3, iou_threshold=0.5).localize(img)
    # box 1 is suppressed by NMS, box 3 by the threshold; full image appended last
    assert [r.score for r in regions] == pytest.approx([0.9, 0.7, 0.0])
    assert regions[0].box == (20, 10, 100, 50)
    assert regions[1].box == (120, 60, 180, 95)
    assert regions[-1].box == (0, 0, 200, 100)
    assert all(_inside(r, img.size) for r in regions)


def test_onnx_detector_falls_back_to_full_image(tiny_detector):
    img = Image.new("RGB", (50, 40))
    regions = OnnxDetectorLocalizer(tiny_detector, score_threshold=0.95).localize(img)
    assert regions == [Region((0, 0, 50, 40), 1.0)]


def test_nms_keeps_best_of_overlaps():
    assert nms(BOXES, SCORES, 0.5) == [0, 2, 3]
    assert nms(BOXES, SCORES, 1.0) == [0, 1, 2, 3]


def test_scda_regions_from_synthetic_feature_map():
    f = np.zeros((4, 7, 7), np.float32)
    f[:, 1:4, 1:3] = 5.0  # big blob -> main
    f[:, 5, 5] = 3.0  # small blob
    regions = regions_from_feature_map(f, (70, 140), min_score=0.0)
    assert regions[0].box == (10, 20, 30, 80)
    assert regions[1].box == (50, 100, 60, 120)
    assert regions[-1].box == (0, 0, 70, 140)
    assert regions[0].score > regions[1].score


def test_scda_uniform_map_gives_full_image():
    regions = regions_from_feature_map(np.ones((4, 7, 7), np.float32), (33, 44))
    assert regions == [Region((0, 0, 33, 44), 1.0)]


def test_saliency_localizer_on_real_images(pipeline, real_images):
    loc = SaliencyLocalizer(pipeline._features)
    for img in real_images:
        regions = loc.localize(img)
        assert regions, "never empty"
        assert all(_inside(r, img.size) for r in regions)
        assert regions[0].score == max(r.score for r in regions)  # main first
        assert regions[-1].box == (0, 0, *img.size)


def test_region_crop_margin_stays_inside():
    img = Image.new("RGB", (100, 50))
    crop = Region((90, 40, 100, 50), 1.0).crop(img, margin=0.5)
    assert crop.size == (15, 15)


def test_pipeline_with_detector_plugin(pipeline, tiny_detector, real_images):
    from vision.runtime import VisionPipeline

    pipe = VisionPipeline(pipeline.entry, pipeline.embedder, localizer=OnnxDetectorLocalizer(tiny_detector))
    img = real_images[0]
    q = pipe.embed_query(img, max_regions=3)
    w, h = img.size
    assert q.regions[0].box == (int(0.1 * w), int(0.1 * h), int(np.ceil(0.5 * w)), int(np.ceil(0.5 * h)))
    assert q.regions[1].box == (0, 0, w, h)  # full image second
    assert q.vectors.shape == (3, pipe.dim)
    assert np.allclose(np.linalg.norm(q.vectors, axis=1), 1.0, atol=1e-5)


def test_pipeline_without_crop_puts_full_image_first(pipeline, real_images):
    from dataclasses import replace

    from vision.registry import CropPolicy
    from vision.runtime import VisionPipeline

    entry = replace(pipeline.entry, crop=CropPolicy(catalog="none", query="none"))
    pipe = VisionPipeline(entry, pipeline.embedder)
    img = real_images[1]
    q = pipe.embed_query(img, max_regions=2)
    assert q.regions[0].box == (0, 0, *img.size)
    assert np.allclose(q.vectors[0], pipe.embed_catalog([img])[0], atol=1e-5)
    assert pipe.embed_query(img, max_regions=1).regions == [Region((0, 0, *img.size), 1.0)]
