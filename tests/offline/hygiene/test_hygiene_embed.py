"""Embedding photos for the hygiene tools: bad photos are recorded, not fatal; the .npz round-trips."""

from __future__ import annotations

import numpy as np
from PIL import Image

from offline.hygiene.embed import embed_labelled, load_vectors


class FakePipeline:
    model_id = "fake@1"

    def embed_catalog(self, images, batch_size=32):
        return np.array([np.asarray(im.resize((2, 2))).astype(np.float32).ravel() + 1 for im in images])


def test_bad_photos_reported_and_npz_roundtrip(tmp_path):
    paths, ids = [], []
    for k in range(5):
        p = tmp_path / f"{k}.png"
        Image.new("RGB", (8, 8), (40 * k, 10, 200)).save(p)
        paths.append(str(p))
        ids.append(f"p{k}")
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff truncated")
    paths.insert(2, str(tmp_path / "bad.jpg"))
    ids.insert(2, "bad")
    paths.append(str(tmp_path / "missing.jpg"))
    ids.append("missing")
    lv = embed_labelled(ids, paths, [0, 0, 0, 1, 1, 1, 1], {0: "a", 1: "b"}, FakePipeline(), batch_size=2)
    assert lv.ids == ["p0", "p1", "p2", "p3", "p4"] and list(lv.labels) == [0, 0, 1, 1, 1]
    assert {f["id"]: f["reason"] for f in lv.failures} == {"bad": "corrupt", "missing": "missing"}
    assert np.allclose(np.linalg.norm(lv.vectors, axis=1), 1, atol=1e-5)
    lv.save(tmp_path / "v.npz")
    back = load_vectors(tmp_path / "v.npz")
    assert back.ids == lv.ids and back.model_id == "fake@1" and back.label_names == {0: "a", 1: "b"}
    assert np.allclose(back.vectors, lv.vectors) and back.failures == lv.failures
