"""The tuning and evaluation commands run on any directory with the GroceryStore layout and any
split name (the held-out test split is evaluated that way)."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image


def _tiny_dataset(root, images):
    ds = root / "dataset"
    lines = {"train": [], "test": []}
    rows = ["Class Name (str),Class ID (int),Coarse Class Name (str),Coarse Class ID (int),Iconic,Desc"]
    for cls in range(2):
        icon = f"/iconic-images-and-descriptions/C{cls}/C{cls}_Iconic.jpg"
        (ds / icon.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
        images[8 + cls].save(ds / icon.lstrip("/"))
        rows.append(f"C{cls},{cls},K,0,{icon},/x.txt")
        for j in range(2):
            for split, img in (("train", images[cls * 4 + j]), ("test", images[cls * 4 + 2 + j])):
                rel = f"{split}/C{cls}_{j}.jpg"
                (ds / split).mkdir(parents=True, exist_ok=True)
                img.save(ds / rel)
                lines[split].append(f"{rel}, {cls}, 0")
    (ds / "classes.csv").write_text("\n".join(rows) + "\n")
    for split, ls in lines.items():
        (ds / f"{split}.txt").write_text("\n".join(ls) + "\n")
    return root


def test_tune_and_evaluate_on_another_dir_and_split(tmp_path, real_images, model_dir):
    from vision import evaluate, tune

    data = _tiny_dataset(tmp_path / "ds", real_images)
    out = tmp_path / "tune.json"
    assert tune.main(["--data", str(data), "--split", "test", "--sizes", "224", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["split"] == "test" and report["n_queries"] == 4 and report["n_photos"] == 4
    assert 0.0 <= report["best"]["p2c_R@1"] <= 1.0
    out2 = tmp_path / "eval.json"
    args = ["--data", str(data), "--split", "test", "--model", "lite0-imagenet", "--out", str(out2)]
    assert evaluate.main(args) == 0
    res = json.loads(out2.read_text())["results"]
    assert set(res) == {"p2c", "p2p"} and 0.0 <= res["p2p"]["max"]["R@1"] <= 1.0


def test_degenerate_images_embed(pipeline):
    imgs = [Image.new("RGB", (1, 1), "red"), Image.new("RGB", (1000, 7), "blue"), Image.new("RGB", (5, 900))]
    v = pipeline.embed_catalog(imgs)
    assert v.shape == (3, pipeline.dim) and np.isfinite(v).all()
    for img in imgs:
        q = pipeline.embed_query(img)
        assert np.isfinite(q.vectors).all() and q.regions
