"""``python -m offline descriptor``: a served model whose embedding is [trained embedding, w · trunk GAP].

The derived graph must compute exactly its documented formula from the source graph's outputs, keep
the other outputs as they were, serve through the registry like any model (its dimension is what
the graph says), and refuse what it cannot derive with one line."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from offline.training.data import load_rgb, read_split
from offline.training.descriptor import derive, derive_graph, fit_pca, main, trunk_concat
from vision.preprocess import Preprocess, preprocess
from vision.registry import ModelRegistry
from vision.runtime import VisionPipeline

REPO = Path(__file__).resolve().parents[3]
SHIPPED = "lite0-grocery-v2-s224"


@pytest.fixture(scope="module")
def shipped_onnx() -> Path:
    return ModelRegistry(REPO / "models").resolve(SHIPPED)[1]


@pytest.fixture(scope="module")
def photos(grocery) -> np.ndarray:
    paths = [s.path for s in read_split(grocery, "val")[::60]]
    return preprocess([load_rgb(p) for p in paths], Preprocess(input_size=224))


def _outputs(path: Path, x: np.ndarray) -> dict[str, np.ndarray]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"input": x}), strict=True))


@pytest.mark.parametrize("pca_k", [0, 64])
def test_the_derived_graph_computes_its_formula(shipped_onnx, photos, tmp_path, pca_k):
    rng = np.random.default_rng(0)
    pca = None
    if pca_k:
        q, _ = np.linalg.qr(rng.normal(size=(1280, pca_k)))
        pca = (rng.normal(scale=0.01, size=1280).astype(np.float32), q.astype(np.float32))
    out = tmp_path / "derived.onnx"
    dim = derive_graph(shipped_onnx, out, weight=0.7, pca=pca)
    assert dim == 512 + (pca_k or 1280)
    src, got = _outputs(shipped_onnx, photos), _outputs(out, photos)
    assert list(got) == ["features", "embedding", "coarse_logits"]
    want = trunk_concat(src["embedding"], src["features"], 0.7, pca)
    assert got["embedding"].shape == (len(photos), dim)
    assert float((want * got["embedding"]).sum(1).min()) > 0.99999
    assert np.allclose(np.linalg.norm(got["embedding"], axis=1), 1.0, atol=1e-5)
    # the trained part is the source's embedding scaled by 1/||[e, w·g]|| = 1/sqrt(1 + w²)
    assert np.allclose(got["embedding"][:, :512] * np.sqrt(1 + 0.7**2), src["embedding"], atol=1e-5)
    assert np.abs(got["coarse_logits"] - src["coarse_logits"]).max() < 1e-5
    assert np.abs(got["features"] - src["features"]).max() < 1e-5
    with pytest.raises(ValueError, match="already holds"):
        derive_graph(out, tmp_path / "twice.onnx", weight=1.0)


def test_pca_is_fitted_on_normalised_descriptors_and_bounded():
    x = np.random.default_rng(1).normal(size=(50, 1280)).astype(np.float32)
    mu, proj = fit_pca(x, 8)
    assert mu.shape == (1280,) and proj.shape == (1280, 8)
    assert np.allclose(proj.T @ proj, np.eye(8), atol=1e-5)
    with pytest.raises(ValueError, match="--pca 51"):
        fit_pca(x, 51)


def _tiny(grocery: Path, root: Path) -> Path:
    """Classes 0-3 and 41-42 of the grocery dataset, 2 val and 3 train photos each (links to its files)."""
    src, ds = grocery / "dataset", root / "dataset"
    ds.mkdir(parents=True)
    for sub in ("iconic-images-and-descriptions", "train", "val"):
        (ds / sub).symlink_to(src / sub)
    keep = {0, 1, 2, 3, 41, 42}
    lines = (src / "classes.csv").read_text().splitlines()
    (ds / "classes.csv").write_text("\n".join([lines[0], *[r for r in lines[1:] if int(r.split(",")[1]) in keep]]) + "\n")
    for split, n in (("val", 2), ("train", 3)):
        rows, per = [], {}
        for r in (src / f"{split}.txt").read_text().splitlines():
            c = int(r.split(",")[1])
            if c in keep and per.get(c, 0) < n:
                per[c] = per.get(c, 0) + 1
                rows.append(r)
        (ds / f"{split}.txt").write_text("\n".join(rows) + "\n")
    return root


def test_derive_scores_registers_and_serves(shipped_onnx, grocery, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(shipped_onnx, models / shipped_onnx.name)
    reg = ModelRegistry(models)
    reg.register_model(ModelRegistry(REPO / "models").get(SHIPPED), activate=True)
    data = _tiny(grocery, tmp_path / "tiny")
    entry = derive(source=SHIPPED, name="derived", weight=1.0, pca_k=8, data=str(data), split="val",
                   seen_spec="0-3", model_dir=models)
    assert reg.active == SHIPPED  # registered beside it, not activated
    assert entry.dim == 520 and reg.get("derived") == entry and entry.model_id != reg.get(SHIPPED).model_id
    m = entry.metrics
    val = read_split(data, "val")
    n_seen = sum(s.fine_id <= 3 for s in val)
    assert 0 < n_seen < len(val)
    assert m["val"]["n_queries"] == n_seen and m["val_unseen_classes"]["n_queries"] == len(val) - n_seen
    assert m["val"]["n_catalog"] == 6 and m["val_unseen_catalog_only"]["n_catalog"] == 2
    assert m["source_val"]["seen"]["n_queries"] == n_seen
    assert m["graph_check"]["min_cosine"] > 0.9999
    for part in (m["val"], m["val_unseen_classes"], m["source_val"]["unseen"]):
        assert 0.0 <= part["photo2catalog_r1"] <= 1.0 and 0.0 <= part["photo2photo_r1"] <= 1.0
    pipe = VisionPipeline.from_registry(models, "derived", threads=1)
    assert pipe.dim == 520
    v = pipe.embedder.embed_images([load_rgb(s.path) for s in val[:2]], pipe.preprocessing)
    assert v.shape == (2, 520) and np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert not list(models.glob(".derive.*"))  # no temporary file left behind


def test_what_cannot_be_derived_is_one_line(tmp_path, capsys, model_dir):
    assert main(["--from", "no-such-model", "--name", "x", "--model-dir", str(model_dir)]) == 2
    assert "not registered" in capsys.readouterr().out
    # the ImageNet model is multi-scale and cropped: its vectors are not one graph output
    assert main(["--from", "lite0-imagenet", "--name", "x", "--model-dir", str(model_dir)]) == 2
    assert "single-scale" in capsys.readouterr().out
    assert main(["--from", SHIPPED, "--name", "x", "--weight", "0", "--model-dir", str(model_dir)]) == 2
    assert "--weight" in capsys.readouterr().out
    assert not (Path(model_dir) / "x.onnx").exists()
