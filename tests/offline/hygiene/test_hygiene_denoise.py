"""SKU denoising on synthetic clusters with planted outliers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from offline.hygiene.__main__ import main
from offline.hygiene.denoise import DenoiseParams, denoise, denoise_report, write_denoise_report
from offline.hygiene.embed import LabelledVectors

DIM = 32


def _sku_data(seed: int = 0):
    """3 SKUs: a tight core each (spread 0.02 per dim), 2 near points (a bit outside the core), 2 outliers
    (vectors of another SKU's direction or random)."""
    rng = np.random.default_rng(seed)
    centres = np.linalg.qr(rng.normal(size=(DIM, DIM)))[0][:3] * 1.0
    vecs, labels, kinds = [], [], []
    for lab, c in enumerate(centres):
        for _ in range(30):
            vecs.append(c + rng.normal(scale=0.02, size=DIM))
            labels.append(lab)
            kinds.append("core")
        for _ in range(2):  # near: outside the dense core but close to its centre
            d = rng.normal(size=DIM)
            d -= d @ c * c
            vecs.append(c + 0.25 * d / np.linalg.norm(d))  # cosine distance ~0.03 to the centre
            labels.append(lab)
            kinds.append("near")
        other = centres[(lab + 1) % 3]
        vecs.append(other + rng.normal(scale=0.05, size=DIM))  # mislabelled image of another SKU
        labels.append(lab)
        kinds.append("outlier")
        vecs.append(rng.normal(size=DIM))  # junk
        labels.append(lab)
        kinds.append("outlier")
    v = np.array(vecs, np.float32)
    return np.array(labels), v / np.linalg.norm(v, axis=1, keepdims=True), np.array(kinds)


@pytest.mark.parametrize(
    "params",
    [
        DenoiseParams(eps_quantile=0.8, winback_factor=5.0, winback_nearest_sku=False),
        DenoiseParams(eps=0.015, winback=0.1, winback_nearest_sku=False),
        DenoiseParams(
            eps_scope="label",
            eps_quantile=0.8,
            winback_mode="nearest",
            winback_factor=4.0,
            winback_nearest_sku=False,
        ),
    ],
)
def test_outliers_flagged_near_points_won_back(params):
    labels, vecs, kinds = _sku_data()
    res = denoise(labels, vecs, params)
    flagged = set(res.flagged_indices)
    assert flagged == set(np.nonzero(kinds == "outlier")[0].tolist())
    assert set(np.nonzero(kinds == "near")[0].tolist()) <= set(res.won_back_indices)
    for r in res.labels:
        assert len(r.core) >= 28 and r.status == "ok"


def test_nearest_sku_pass_keeps_only_lookalikes_of_other_skus():
    labels, vecs, kinds = _sku_data(1)
    res = denoise(labels, vecs, DenoiseParams(eps_quantile=0.8, winback_factor=2.0))
    flagged = set(res.flagged_indices)
    mislabelled = {
        i for i in np.nonzero(kinds == "outlier")[0] if vecs[i] @ vecs[labels == labels[i]].mean(0) < 0.5
    }
    assert mislabelled & flagged  # the planted other-SKU images stay flagged
    for r in res.labels:
        for i in r.nearest_other:
            assert r.nearest_other[i][0] != r.label


def test_small_labels_kept_and_report(tmp_path):
    labels, vecs, kinds = _sku_data()
    labels = np.append(labels, [9, 9])
    vecs = np.vstack([vecs, vecs[:2]])
    res = denoise(labels, vecs, DenoiseParams(eps_quantile=0.8, winback_factor=2.0))
    small = [r for r in res.labels if r.label == 9][0]
    assert small.status == "small" and not small.flagged
    ids = [f"img{i}" for i in range(len(labels))]
    rep = denoise_report(res, ids, {0: "zero"})
    assert rep["summary"]["flagged"] == len(res.flagged_indices) and rep["labels"][0]["flagged"]
    files = write_denoise_report(rep, tmp_path)
    assert json.loads(files[0].read_text())["summary"]["images"] == len(labels)
    assert "Flagged images" in files[1].read_text()


def test_cli_with_precomputed_vectors_and_contact_sheet(tmp_path, capsys):
    from PIL import Image

    labels, vecs, kinds = _sku_data()
    paths = []
    for i in range(len(labels)):
        p = tmp_path / f"{i}.png"
        Image.new("RGB", (20, 20), (i % 255, 50, 100)).save(p)
        paths.append(str(p))
    ids = [f"img{i}" for i in range(len(labels))]
    npz = tmp_path / "v.npz"
    LabelledVectors(ids, labels, vecs, paths, {0: "a", 1: "b", 2: "c"}, "synthetic", []).save(npz)
    out = tmp_path / "out"
    assert (
        main(
            [
                "--out",
                str(out),
                "-q",
                "denoise",
                "--vectors",
                str(npz),
                "--eps-quantile",
                "0.8",
                "--winback-factor",
                "2",
            ]
        )
        == 0
    )
    rep = json.loads((out / "denoise.json").read_text())
    assert rep["summary"]["flagged"] >= 3 and rep["model_id"] == "synthetic"
    assert (out / "denoise_flagged.png").stat().st_size > 0
    assert "flagged" in capsys.readouterr().out
