"""SKU merge proposals from a planted confusion matrix and from embeddings (LOO nearest centroid)."""

from __future__ import annotations

import json

import numpy as np

from offline.hygiene.__main__ import main
from offline.hygiene.embed import LabelledVectors
from offline.hygiene.merge import merge_from_embeddings, ncc_loo_predict, propose_merges


def test_planted_confusion_matrix():
    conf = np.array(
        [
            [80, 20, 0, 0],  # 0 → 1 at 20%
            [5, 95, 0, 0],  # 1 → 0 at 5% (symmetric max still 20%)
            [0, 0, 97, 3],  # 2 → 3 at 3%: below threshold
            [0, 1, 0, 9],  # 3 → 1 at 10% but only 1 confusion (min_count)
        ]
    )
    rep = propose_merges(
        conf, [10, 11, 12, 13], threshold=0.1, min_count=2, names={10: "gala", 11: "pink lady"}
    )
    assert [(p["i"], p["j"]) for p in rep["pairs"]] == [(10, 11)]
    p = rep["pairs"][0]
    assert (p["c_ij"], p["c_ji"], p["p_ij"], p["p_ji"], p["n_i"], p["n_j"]) == (20, 5, 0.2, 0.05, 100, 100)
    assert rep["groups"] == [[{"label": 10, "name": "gala"}, {"label": 11, "name": "pink lady"}]]
    rep1 = propose_merges(conf, [10, 11, 12, 13], threshold=0.1, min_count=1)
    assert {(p["i"], p["j"]) for p in rep1["pairs"]} == {(10, 11), (11, 13)}
    assert [len(g) for g in rep1["groups"]] == [3]  # transitive: 10-11-13
    one_way = propose_merges(conf, [10, 11, 12, 13], threshold=0.15, symmetric=False)
    assert [(p["i"], p["j"]) for p in one_way["pairs"]] == [(10, 11)]
    assert propose_merges(conf, [10, 11, 12, 13], threshold=0.25)["pairs"] == []


def _two_overlapping_classes(seed=0):
    rng = np.random.default_rng(seed)
    c = np.eye(16)[:4] * 1.0
    c[1] = c[0] * 0.98 + c[1] * 0.2  # classes 0 and 1 nearly the same direction
    vecs, labels = [], []
    for lab in range(4):
        for _ in range(25):
            vecs.append(c[lab] / np.linalg.norm(c[lab]) + rng.normal(scale=0.15, size=16))
            labels.append(lab)
    return np.array(labels), np.array(vecs, np.float32)


def test_loo_nearest_centroid_and_proposals():
    labels, vecs = _two_overlapping_classes()
    classes, pred = ncc_loo_predict(labels, vecs)
    assert list(classes) == [0, 1, 2, 3]
    assert (pred[labels >= 2] == labels[labels >= 2]).all()
    ids = [f"x{i}" for i in range(len(labels))]
    rep = merge_from_embeddings(ids, labels, vecs, threshold=0.15)
    assert [(p["i"], p["j"]) for p in rep["pairs"]] == [(0, 1)]
    assert rep["pairs"][0]["examples_i_as_j"] or rep["pairs"][0]["examples_j_as_i"]


def test_loo_excludes_own_image():
    # one class's single far-off image would be "correct" if its own vector stayed in the centroid
    vecs = np.array([[1, 0], [1, 0.1], [0, 1], [0.1, 1], [0.9, 0.2]], np.float32)
    labels = np.array([0, 0, 1, 1, 2])
    _, pred = ncc_loo_predict(labels, vecs)
    assert pred[4] == 0  # singleton class 2 cannot predict itself


def test_cli_merge_from_confusion_file_and_vectors(tmp_path, capsys):
    conf = tmp_path / "conf.json"
    conf.write_text(
        json.dumps({"classes": [3, 4], "matrix": [[8, 2], [0, 10]], "names": {"3": "a", "4": "b"}})
    )
    out = tmp_path / "out"
    assert main(["--out", str(out), "-q", "merge", "--confusion", str(conf)]) == 0
    rep = json.loads((out / "merge.json").read_text())
    assert rep["pairs"][0]["p_ij"] == 0.2 and "a (3)" in (out / "merge.md").read_text()
    labels, vecs = _two_overlapping_classes(1)
    npz = tmp_path / "v.npz"
    LabelledVectors([f"x{i}" for i in range(len(labels))], labels, vecs, [], {}, "m", []).save(npz)
    assert main(["--out", str(out), "-q", "merge", "--vectors", str(npz), "--name", "m2"]) == 0
    assert json.loads((out / "m2.json").read_text())["summary"]["pairs_proposed"] == 1
    assert "pairs proposed" in capsys.readouterr().out
