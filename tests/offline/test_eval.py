"""Quality gate: the production ingest + query code on the val split must keep the numbers reached
(`make eval`, README), minus a margin of ~0.03 for platform noise, so a regression fails CI.

The shipped (active) model is checked on every task; the ImageNet model and the trunk-descriptor model
(``lite0-grocery-v2t-s224``), still selectable, are checked on photo→catalog in the fast suite and on
everything in the slow one (the ImageNet model's multi-scale, cropped gallery of 2,640 photos takes
minutes on 2 cores)."""

import json

import pytest

from offline.evaluate import evaluate
from tests.conftest import grocery_root
from tongkuan.config import ToolConfig
from vision.registry import ModelRegistry
from vision.settings import RuntimeSettings

# Measured on val with `make eval` (README), minus ~0.03.
FLOORS = {
    "lite0-imagenet": {
        "photo_to_catalog.recall@1": 0.39, "photo_to_catalog.recall@5": 0.65,
        "photo_to_photo.recall@1": 0.52, "coarse_accuracy": 0.72,
    },
    "lite0-grocery-v1": {
        "photo_to_catalog.recall@1": 0.69, "photo_to_catalog.recall@5": 0.93,
        "photo_to_photo.recall@1": 0.74, "coarse_accuracy": 0.86,
    },
    "lite0-grocery-v2-s224": {
        "photo_to_catalog.recall@1": 0.83, "photo_to_catalog.recall@5": 0.93,
        "photo_to_photo.recall@1": 0.83, "coarse_accuracy": 0.89,
    },
    # the shipped model + its trunk descriptor (offline.training.descriptor), selectable, not active
    "lite0-grocery-v2t-s224": {
        "photo_to_catalog.recall@1": 0.81, "photo_to_catalog.recall@5": 0.93,
        "photo_to_photo.recall@1": 0.82, "coarse_accuracy": 0.89,
    },
    "lite0-grocery-v2": {
        "photo_to_catalog.recall@1": 0.79, "photo_to_catalog.recall@5": 0.91,
        "photo_to_photo.recall@1": 0.80, "coarse_accuracy": 0.90,
    },
}


def _get(metrics, dotted):
    node = metrics
    for part in dotted.split("."):
        node = node[part]
    return node


def _check(model, model_dir, tmp_path, *, photo_to_photo):
    data = grocery_root()
    assert model in FLOORS, f"no val floors recorded for {model}: run `make eval` and add them here"
    cfg = ToolConfig(runtime=RuntimeSettings(model_dir=model_dir, model=model))
    metrics = evaluate(data, "val", cfg=cfg, out_dir=tmp_path, progress=False, photo_to_photo=photo_to_photo)
    saved = json.loads((tmp_path / "eval-val.json").read_text())
    assert (tmp_path / "eval-val.png").stat().st_size > 0
    for key, floor in FLOORS[model].items():
        if not photo_to_photo and not key.startswith("photo_to_catalog"):
            continue
        assert _get(saved, key) == _get(metrics, key)
        assert _get(metrics, key) >= floor, f"{model} {key} = {_get(metrics, key):.3f} < {floor}"


def test_shipped_model_val_metrics_hold(model_dir, tmp_path):
    _check(ModelRegistry(model_dir).active, model_dir, tmp_path, photo_to_photo=True)


def test_imagenet_photo_to_catalog_holds(model_dir, tmp_path):
    _check("lite0-imagenet", model_dir, tmp_path, photo_to_photo=False)


def test_trunk_descriptor_model_photo_to_catalog_holds(model_dir, tmp_path):
    _check("lite0-grocery-v2t-s224", model_dir, tmp_path, photo_to_photo=False)


@pytest.mark.slow
def test_trunk_descriptor_model_all_val_metrics_hold(model_dir, tmp_path):
    _check("lite0-grocery-v2t-s224", model_dir, tmp_path, photo_to_photo=True)


@pytest.mark.slow
def test_imagenet_all_val_metrics_hold(model_dir, tmp_path):
    _check("lite0-imagenet", model_dir, tmp_path, photo_to_photo=True)
