"""Quantized search with rescoring on Qdrant Edge: every quantization, after ``optimize()`` built
the HNSW graph and the quantized copies, keeps recall@10 against exact search; the settings reach
both backends through ``open_index``."""

from __future__ import annotations

import numpy as np
import pytest

from index.base import IndexPoint
from index.edge import EdgeIndex
from index.factory import open_index
from index.settings import DEFAULT_OVERSAMPLING, EdgeIndexSettings, QdrantIndexSettings

DIM = 256  # binary quantization needs dimensions to work with: 1 bit each
N, CLUSTERS, QUERIES = 3000, 40, 60


def clustered(rng: np.random.Generator, n: int, spread: float = 1.0) -> np.ndarray:
    """Unit vectors around ``CLUSTERS`` random centres, noise of norm ~``spread``: neighbours within
    a cluster are close but not trivially separated, so a weak quantized ranking shows in the recall."""
    centres = rng.standard_normal((CLUSTERS, DIM)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    noise = rng.standard_normal((n, DIM)).astype(np.float32) * (spread / np.sqrt(DIM))
    x = centres[rng.integers(0, CLUSTERS, n)] + noise
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(15)
    vectors = clustered(rng, N + QUERIES)
    base, queries = vectors[:N], vectors[N:]
    truth = np.argsort(-(queries @ base.T), axis=1)[:, :10]
    return base, queries, truth


def build(tmp_path, base: np.ndarray, **options) -> EdgeIndex:
    # 1 kB thresholds: a few thousand vectors get a graph (and quantized copies) instead of brute
    # force. A narrow beam (ef 16, below the 10 x oversampling candidates), so that the quantized
    # ranking and the oversampling carry the recall rather than a beam covering the clusters.
    ix = EdgeIndex(tmp_path, DIM, indexing_threshold_kb=1, full_scan_threshold_kb=1, hnsw_ef=16, **options)
    ix.upsert([IndexPoint(f"i{i}", "s", v) for i, v in enumerate(base)])
    ix.optimize()
    assert ix.indexed_vectors_count() == len(base)
    return ix


def recall_at_10(ix: EdgeIndex, queries: np.ndarray, truth: np.ndarray) -> float:
    found = 0
    for q, t in zip(queries, truth, strict=True):
        ids = {int(h.item_id[1:]) for h in ix.search(q, limit=10)}
        found += len(ids & set(t.tolist()))
    return found / truth.size


@pytest.mark.parametrize("quantization", [None, "int8", "binary"])
def test_recall_at_10_against_exact_search(tmp_path, data, quantization) -> None:
    base, queries, truth = data
    ix = build(tmp_path, base, quantization=quantization)
    try:
        assert recall_at_10(ix, queries, truth) >= 0.9
        hits = ix.search(base[7], limit=10)
        # Rescored with the float vectors: the point itself, at its exact cosine.
        assert hits[0].item_id == "i7" and hits[0].score == pytest.approx(1.0, abs=1e-4)
    finally:
        ix.close()


def test_binary_needs_its_oversampling(tmp_path, data) -> None:
    base, queries, truth = data
    ix = build(tmp_path, base, quantization="binary", oversampling=1.0)
    try:
        assert recall_at_10(ix, queries, truth) < 0.8  # ~0.5 here: why binary defaults to 8
    finally:
        ix.close()


def test_without_rescoring_binary_returns_quantized_scores_and_loses_recall(tmp_path, data) -> None:
    base, queries, truth = data
    ix = build(tmp_path, base, quantization="binary", rescore=False)
    try:
        scores = [h.score for h in ix.search(base[7], limit=10)]
        exact = np.sort(base @ base[7])[::-1][:10]
        assert not np.allclose(scores, exact, atol=1e-3)
        assert recall_at_10(ix, queries, truth) < 0.9  # why rescoring is on by default
    finally:
        ix.close()


def test_an_unknown_quantization_is_refused(tmp_path) -> None:
    from index.base import IndexBackendError

    with pytest.raises(IndexBackendError, match="quantization"):
        EdgeIndex(tmp_path, DIM, quantization="pq")  # type: ignore[arg-type]


@pytest.mark.parametrize(("settings", "module", "cls"), [
    (EdgeIndexSettings(quantization="binary", quantization_oversampling=5.0, quantization_rescore=False),
     "index.edge", "EdgeIndex"),
    (QdrantIndexSettings(url=":memory:", quantization="binary", quantization_oversampling=5.0,
                         quantization_rescore=False), "index.qdrant", "QdrantIndex"),
])
def test_the_settings_reach_the_backend(monkeypatch, tmp_path, settings, module, cls) -> None:
    seen: dict = {}

    class Recorder:
        def __init__(self, *args, **options) -> None:
            seen.update(options)
            self.dim, self.text_dim = DIM, 0

        def close(self) -> None:
            pass

    monkeypatch.setattr(f"{module}.{cls}", Recorder)
    if isinstance(settings, EdgeIndexSettings):
        settings = settings.model_copy(update={"dir": tmp_path})
    handle = open_index(settings, DIM, model_id="m")
    handle.close()
    assert (seen["quantization"], seen["oversampling"], seen["rescore"]) == ("binary", 5.0, False)


def test_oversampling_defaults_per_quantization() -> None:
    from index.edge import search_params

    assert EdgeIndexSettings().quantization_oversampling is None
    for quantization, expected in DEFAULT_OVERSAMPLING.items():
        assert search_params(64, quantization).quantization.oversampling == expected  # type: ignore[arg-type]
    assert search_params(64, "int8", oversampling=3.0).quantization.oversampling == 3.0
    assert search_params(64, None).quantization is None
