"""The evaluation and tuning commands on a tiny dataset in the GroceryStore layout, with a split
name of its own (the held-out test split is evaluated that way), checked against numbers computed
here independently: the same model's vectors ranked with numpy, no index, no search code."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

CLASSES = 4  # C0..C3 under one top-level category (one shard) and two coarse categories


def _tiny_dataset(root, images):
    """Catalog: photos 0-3 are the iconic images of C0-C3. Test split: photos 0, 1, 2 (their own
    catalog image: rank 1 for sure) and photo 4 labelled C3 (a different picture). Train split
    (the photo gallery): photos 4-7 labelled C0-C3."""
    ds = root / "dataset"
    rows = ["Class Name (str),Class ID (int),Coarse Class Name (str),Coarse Class ID (int),Iconic,Desc"]
    for c in range(CLASSES):
        icon = f"/iconic-images-and-descriptions/Top/K{c // 2}/C{c}/C{c}_Iconic.jpg"
        (ds / icon.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
        images[c].save(ds / icon.lstrip("/"), quality=95)
        rows.append(f"C{c},{c},K{c // 2},{c // 2},{icon},/x.txt")
    (ds / "classes.csv").write_text("\n".join(rows) + "\n")
    splits = {"test": [(0, 0), (1, 1), (2, 2), (4, 3)], "train": [(4, 0), (5, 1), (6, 2), (7, 3)]}
    for split, pairs in splits.items():
        (ds / split).mkdir(parents=True, exist_ok=True)
        lines = []
        for n, (img, cls) in enumerate(pairs):
            rel = f"{split}/q{n}.jpg"
            images[img].save(ds / rel, quality=95)
            lines.append(f"{rel}, {cls}, {cls // 2}")
        (ds / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return root, splits


def _expected(pipe, ds_root, splits):
    """R@1/R@5 and mAP of photo → catalog and photo → photo, from the model's vectors with numpy."""
    from vision.decode import load_image

    ds = ds_root / "dataset"
    icons = [load_image(next((ds / "iconic-images-and-descriptions").rglob(f"C{c}_Iconic.jpg")))
             for c in range(CLASSES)]
    galleries = {"photo_to_catalog": (pipe.embed_catalog(icons), np.arange(CLASSES)),
                 "photo_to_photo": (pipe.embed_catalog([load_image(ds / "train" / f"q{n}.jpg")
                                                        for n in range(len(splits["train"]))]),
                                    np.array([cls for _, cls in splits["train"]]))}
    queries = [pipe.embed_query(load_image(ds / "test" / f"q{n}.jpg"), max_regions=1).vectors
               for n in range(len(splits["test"]))]
    out = {}
    for name, (gallery, labels) in galleries.items():
        first, aps = [], []
        for q, (_, cls) in zip(queries, splits["test"], strict=True):
            order = labels[np.argsort(-(q @ gallery.T).max(axis=0), kind="stable")]
            ranks = [i + 1 for i, lab in enumerate(order) if lab == cls]
            first.append(ranks[0])
            aps.append(sum((j + 1) / r for j, r in enumerate(ranks)) / len(ranks))
        out[name] = {"recall@1": sum(r == 1 for r in first) / len(first), "mAP": float(np.mean(aps)),
                     "recall@5": sum(r <= 5 for r in first) / len(first)}
    return out


def test_eval_on_another_dir_and_split_gives_the_numbers_numpy_gives(tmp_path, real_images, model_dir):
    from offline import evaluate
    from vision.registry import ModelRegistry
    from vision.runtime import VisionPipeline
    from vision.settings import RuntimeSettings

    root, splits = _tiny_dataset(tmp_path / "ds", real_images)
    out = tmp_path / "reports"
    assert evaluate.main(["--data", str(root), "--split", "test", "--out", str(out), "--quiet"]) == 0
    report = json.loads((out / "eval-test.json").read_text())
    assert report["split"] == "test" and report["queries"] == 4
    pipe = VisionPipeline.from_settings(RuntimeSettings(model_dir=model_dir, model=ModelRegistry(model_dir).active))
    assert report["model_id"] == pipe.model_id
    want = _expected(pipe, root, splits)
    for name in ("photo_to_catalog", "photo_to_photo"):
        got = report[name]
        assert got["gallery"] == 4 and got["failed_items"] == 0
        for metric in ("recall@1", "recall@5", "mAP"):
            assert got[metric] == pytest.approx(want[name][metric]), (name, metric)
    assert want["photo_to_catalog"]["recall@1"] >= 0.75  # the three own pictures come first
    assert report["photo_to_catalog"]["recall@5"] == 1.0  # four catalog items: always within five
    assert (out / "eval-test.png").stat().st_size > 0
    assert evaluate.main(["--data", str(root), "--split", "nope", "--out", str(out)]) == 2  # a clear error


def test_tune_on_another_dir_and_split(tmp_path, real_images, model_dir):
    from offline import tune

    root, _ = _tiny_dataset(tmp_path / "ds", real_images)
    out = tmp_path / "tune.json"
    assert tune.main(["--data", str(root), "--split", "test", "--sizes", "224", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["split"] == "test" and report["n_queries"] == 4 and report["n_photos"] == 4
    # three of the four queries are their own catalog picture: any sane configuration ranks them first
    assert report["best"]["p2c_R@1"] >= 0.75


def test_degenerate_images_embed(pipeline):
    imgs = [Image.new("RGB", (1, 1), "red"), Image.new("RGB", (1000, 7), "blue"), Image.new("RGB", (5, 900))]
    v = pipeline.embed_catalog(imgs)
    assert v.shape == (3, pipeline.dim) and np.isfinite(v).all()
    for img in imgs:
        q = pipeline.embed_query(img)
        assert np.isfinite(q.vectors).all() and q.regions
