"""Several products in one photo: the feature-map segmentation behind ``localize_products`` and the
query regions ``embed_query`` builds from it (issue 15: one region per product on 2x2 mosaics)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from vision.localize import (
    FullImageLocalizer,
    Region,
    SaliencyLocalizer,
    merge_similar_positions,
    product_regions_from_feature_map,
)


def _iou(a, b) -> float:
    iw = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


QUADRANTS = [(0, 0, 40, 40), (40, 0, 80, 40), (0, 40, 40, 80), (40, 40, 80, 80)]


def _quadrant_map(rng, c=64, side=8, noise=0.1) -> np.ndarray:
    """A (c, side, side) ReLU-like map whose four quadrants hold four different 'products' (sparse
    activations on different channels, as a backbone's last map has), plus positive noise."""
    protos = np.abs(rng.normal(size=(4, c))) * (rng.random((4, c)) < 0.3)
    f = np.zeros((c, side, side))
    h = side // 2
    for q, (y, x) in enumerate([(0, 0), (0, h), (h, 0), (h, h)]):
        f[:, y : y + h, x : x + h] = protos[q][:, None, None]
    return np.maximum(f + noise * np.abs(rng.normal(size=f.shape)), 0).astype(np.float32)


def test_segmentation_separates_four_different_quadrants():
    labels = merge_similar_positions(_quadrant_map(np.random.default_rng(0)), 0.5)
    assert len(np.unique(labels)) == 4
    for y, x in [(0, 0), (0, 4), (4, 0), (4, 4)]:
        assert (labels[y : y + 4, x : x + 4] == labels[y, x]).all()


def test_one_region_per_quadrant_then_the_full_image():
    regions = product_regions_from_feature_map(_quadrant_map(np.random.default_rng(1)), (80, 80),
                                               min_similarity=0.5)
    assert sorted(r.box for r in regions[:-1]) == sorted(QUADRANTS)
    assert regions[-1] == Region((0, 0, 80, 80), 0.0)
    assert all(r.score == pytest.approx(0.25) for r in regions[:-1])


def test_one_product_gives_the_full_image_alone():
    f = np.ones((16, 7, 7), np.float32) + 0.01 * np.random.default_rng(2).random((16, 7, 7), np.float32)
    assert product_regions_from_feature_map(f, (70, 70)) == [Region((0, 0, 70, 70), 1.0)]


def test_small_segments_are_dropped_and_the_largest_comes_first():
    rng = np.random.default_rng(3)
    a, b, c = (np.abs(rng.normal(size=32)) for _ in range(3))
    f = np.tile(a[:, None, None], (1, 10, 10))
    f[:, :, 6:] = b[:, None, None]  # 40% of the map
    f[:, 0, 0] = c  # one position: below min_area
    regions = product_regions_from_feature_map(f.astype(np.float32), (100, 100), min_similarity=0.9)
    assert [r.box for r in regions] == [(0, 0, 60, 100), (60, 0, 100, 100), (0, 0, 100, 100)]


def test_a_detector_style_localizer_gives_its_regions_as_products():
    img = Image.new("RGB", (20, 10))
    assert FullImageLocalizer().localize_products(img) == [Region((0, 0, 20, 10), 1.0)]


# -- the shipped model on a mosaic of four real products -----------------------------------------
@pytest.fixture(scope="module")
def shipped(model_dir):
    from vision.runtime import VisionPipeline
    from vision.settings import RuntimeSettings

    return VisionPipeline.from_settings(RuntimeSettings(model_dir=model_dir, ort_threads=2))


@pytest.fixture(scope="module")
def mosaic():
    """Val photos of four products of different top-level or coarse categories (Granny Smith,
    Banana, a juice, a pepper), 348 px each, in a 2x2 grid."""
    from tests.conftest import grocery_root
    from vision.decode import load_image

    root = grocery_root() / "dataset"
    wanted = ["Granny-Smith", "Banana", "Bravo-Apple-Juice", "Red-Bell-Pepper"]
    paths = {}
    for line in (root / "val.txt").read_text().splitlines():
        path = line.split(",")[0].strip()
        name = path.split("/")[-2]
        if name in wanted and name not in paths:
            paths[name] = root / path
    assert sorted(paths) == sorted(wanted)
    canvas = Image.new("RGB", (696, 696))
    for (x, y), name in zip([(0, 0), (348, 0), (0, 348), (348, 348)], wanted, strict=True):
        canvas.paste(load_image(paths[name]).resize((348, 348)), (x, y))
    return canvas


CELLS = [(0, 0, 348, 348), (348, 0, 696, 348), (0, 348, 348, 696), (348, 348, 696, 696)]


def test_saliency_localizer_finds_the_products_of_a_mosaic(shipped, mosaic):
    regions = SaliencyLocalizer(shipped._features).localize_products(mosaic)
    products = [r for r in regions if r.box != (0, 0, 696, 696)]
    assert len(products) >= 3
    found = sum(max(_iou(c, r.box) for r in products) >= 0.5 for c in CELLS)
    assert found >= 3
    assert regions[-1].box == (0, 0, 696, 696)
    # SCDA alone (what a one-product search uses) does not separate them
    assert len([r for r in SaliencyLocalizer(shipped._features).localize(mosaic) if r.box != (0, 0, 696, 696)]) < 3


def test_query_regions_for_several_products(shipped, mosaic):
    full = (0, 0, 696, 696)
    q = shipped.embed_query(mosaic, max_regions=5, multi_object=True)
    boxes = [r.box for r in q.regions]
    # main product first, the full photo as its second view, then the other products
    assert boxes[0] != full and boxes[1] == full and full not in boxes[2:]
    assert len(boxes) >= 4
    assert q.vectors.shape == (len(boxes), shipped.dim)
    assert np.allclose(np.linalg.norm(q.vectors, axis=1), 1.0, atol=1e-5)
    assert [r.box for r in shipped.embed_query(mosaic, max_regions=2, multi_object=True).regions] == boxes[:2]
    # one product asked for: the shipped (crop: none) model still embeds the full photo first
    assert [r.box for r in shipped.embed_query(mosaic, max_regions=5).regions][0] == full
    assert [r.box for r in shipped.embed_query(mosaic, max_regions=1).regions] == [full]
