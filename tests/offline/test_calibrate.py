"""The calibration tool's pure parts: the gate and threshold choices, the AUC, the hold-out split,
mosaic composition and region matching (the full run on val is `python -m offline calibrate`)."""

from __future__ import annotations

import random

import numpy as np
import pytest
from PIL import Image

from offline.calibrate import (
    choose_gate,
    choose_threshold,
    compose_mosaic,
    match_regions,
    mosaic_boxes,
    rejection_at,
    roc_auc,
    split_products,
)


def _rows(costs: dict[float, float]) -> list[dict]:
    return [{"gate": g, "cost": c} for g, c in costs.items()]


def test_gate_is_the_lowest_whose_cost_and_every_higher_ones_fit():
    assert choose_gate(_rows({0.3: 0.03, 0.5: 0.012, 0.6: 0.008, 0.8: 0.0, 1.0: 0.0})) == 0.6
    # a lucky low gate below a costly one is not chosen
    assert choose_gate(_rows({0.3: 0.0, 0.5: 0.02, 0.6: 0.005, 1.0: 0.0})) == 0.6
    # routing that helps (negative cost) counts as within budget; 0.0 is below the swept range
    assert choose_gate(_rows({0.0: -0.01, 0.3: -0.007, 0.9: 0.0})) == 0.3
    assert choose_gate(_rows({0.3: 0.05, 1.0: 0.02})) is None


def test_auc_orders_and_ties():
    neg = [True, True, False, False]
    assert roc_auc([0.1, 0.2, 0.8, 0.9], neg) == 1.0
    assert roc_auc([0.8, 0.9, 0.1, 0.2], neg) == 0.0
    assert roc_auc([0.5, 0.5, 0.5, 0.5], neg) == 0.5
    assert roc_auc([0.1, 0.6, 0.5, 0.9], neg) == 0.75


def test_rejection_precision_recall():
    p = rejection_at([0.1, 0.2, 0.3, 0.8, 0.9], [True, True, False, False, True], 0.35)
    assert p["precision"] == pytest.approx(2 / 3) and p["recall"] == pytest.approx(2 / 3)
    assert p["rejected_share"] == pytest.approx(3 / 5)


def test_threshold_reachable_takes_the_lowest_cut_that_meets_both_targets():
    rng = np.random.default_rng(0)
    neg_s = rng.uniform(0.0, 0.5, 100)
    pos_s = rng.uniform(0.45, 1.0, 100)
    scores = np.concatenate([neg_s, pos_s])
    negative = np.r_[np.ones(100, bool), np.zeros(100, bool)]
    point = choose_threshold(scores, negative, min_precision=0.9, min_recall=0.8)
    assert point["rule"] == "reachable"
    assert point["precision"] >= 0.9 and point["recall"] >= 0.8
    # lowest: one distinct score lower and the recall target is missed
    below = np.sort(scores[scores < point["threshold"]])[-1]
    assert rejection_at(scores, negative, below)["recall"] < 0.8
    # the threshold is a midpoint between two observed scores, so it rejects exactly scores below it
    assert not np.any(scores == point["threshold"])


def test_threshold_unreachable_keeps_precision():
    # negatives and positives overlap completely above 0.5: recall 0.8 at precision 0.9 is impossible
    scores = [0.1, 0.2, 0.6, 0.7, 0.8, 0.6, 0.7, 0.8, 0.9, 0.95]
    negative = [True, True, True, True, True, False, False, False, False, False]
    point = choose_threshold(scores, negative)
    assert point["rule"].startswith("unreachable: highest recall")
    assert point["precision"] >= 0.9 and point["recall"] == pytest.approx(0.4)


def test_hold_out_halves_keep_twins_together_and_balance():
    groups = [[f"p{i}"] for i in range(10)] + [["t0", "t0-twin"], ["t1", "t1-twin", "t1-twin2"]]
    a, b = split_products(groups, seed=3)
    assert a.isdisjoint(b) and len(a | b) == 15
    assert abs(len(a) - len(b)) <= 1 + 2  # within the largest group
    for g in groups:
        assert set(g) <= a or set(g) <= b
    assert split_products(groups, seed=3) == (a, b)
    assert split_products(groups, seed=4) != (a, b)


def test_mosaic_boxes_tile_the_canvas():
    assert mosaic_boxes(696) == [(0, 0, 348, 348), (348, 0, 696, 348), (0, 348, 348, 696), (348, 348, 696, 696)]
    rng = random.Random(0)
    for _ in range(20):
        boxes = mosaic_boxes(600, rng)
        area = sum((b[2] - b[0]) * (b[3] - b[1]) for b in boxes)
        assert area == 600 * 600
        sx, sy = boxes[0][2], boxes[0][3]
        assert 0.35 * 600 <= sx <= 0.65 * 600 and 0.35 * 600 <= sy <= 0.65 * 600


def test_compose_mosaic_puts_each_image_in_its_cell():
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    boxes = mosaic_boxes(100, random.Random(1))
    img = compose_mosaic([Image.new("RGB", (30, 50), c) for c in colours], boxes)
    assert img.size == (100, 100)
    for c, b in zip(colours, boxes, strict=True):
        assert img.getpixel(((b[0] + b[2]) // 2, (b[1] + b[3]) // 2)) == c


def test_match_regions_picks_the_best_overlap_and_reports_misses():
    cells = mosaic_boxes(100)
    boxes = [(0, 0, 100, 100), (0, 0, 55, 50), (50, 50, 100, 100)]
    m = match_regions(cells, boxes)
    assert [j for j, _ in m] == [1, 0, 0, 2]  # top-right only overlaps the full box
    assert m[1][1] == pytest.approx(0.25)
    assert match_regions(cells, [(0, 0, 10, 10)])[3] == (-1, 0.0)
