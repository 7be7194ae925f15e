"""The search-engine benchmark on small synthetic vectors: nested filler sets, the exact ground
truth, and every engine's figures under the report keys ``make bench-query`` reads."""

from __future__ import annotations

import json

import numpy as np
import pytest

from offline.bench import query_engines as qe

DIM = 64


@pytest.fixture(scope="module")
def real() -> np.ndarray:
    rng = np.random.default_rng(3)
    centres = rng.standard_normal((12, DIM)).astype(np.float32)
    x = centres[rng.integers(0, 12, 300)] + 0.4 * rng.standard_normal((300, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_filler_is_nested_unit_and_near_the_real_vectors(real) -> None:
    small, large = qe.filler(real, 500, 0.3, chunk=200), qe.filler(real, 1100, 0.3, chunk=200)
    np.testing.assert_array_equal(small, large[:500])  # 100k is a prefix of 1M
    np.testing.assert_allclose(np.linalg.norm(large, axis=1), 1.0, atol=1e-5)
    assert np.median(qe.nn_cosine_distances(large, real, exclude_self=False)) < 0.1


def test_filler_works_with_fewer_real_vectors_than_dimensions(real) -> None:
    few = real[:20]  # 20 vectors of 64-d: their covariance spans at most 20 directions
    fill = qe.filler(few, 300, 0.3, chunk=100)
    assert fill.shape == (300, DIM)
    np.testing.assert_allclose(np.linalg.norm(fill, axis=1), 1.0, atol=1e-5)
    assert np.median(qe.nn_cosine_distances(fill, few, exclude_self=False)) < 0.1


def test_calibrated_filler_matches_the_real_nn_distances(real) -> None:
    sigma = qe.calibrate_sigma(real, size=3000, sample=200)
    target = np.median(qe.nn_cosine_distances(real, real, exclude_self=True))
    fill = qe.filler(real, 2700, sigma)
    got = np.median(qe.nn_cosine_distances(fill[:200], np.concatenate([real, fill]), exclude_self=True))
    assert got == pytest.approx(target, rel=0.1)


def test_ground_truth_is_exact_across_chunks(real) -> None:
    queries = real[:20] + 0.01
    truth = qe.ground_truth(real, queries, chunk=64)
    np.testing.assert_array_equal(truth, np.argsort(-(queries @ real.T), axis=1)[:, :10])


def test_run_engines_reports_every_engine_and_size(real, tmp_path) -> None:
    queries = qe.filler(real, 40, 0.5, seed=99)
    params = qe.HnswParams(m=16, ef_construct=64, ef=64)
    report = qe.run_engines(real, queries, [300, 2000], list(qe.ENGINES), params, sigma=0.3, timed=60,
                            cache=tmp_path / "engines")
    json.dumps(report)  # the report is plain JSON
    for engine in qe.ENGINES:
        for size in ("items_300", "items_2000"):
            row = report["search"][engine][size]
            assert row["p50_ms"] <= row["p99_ms"] and row["timed_queries"] == 60
            assert row["recall@10"] >= (1.0 if engine == "exact" else 0.9), (engine, size, row)
    assert min(r["items_2000"]["p50_ratio_to_best"] for r in report["search"].values()) == 1.0
    assert report["search"]["edge-int8"]["items_2000"]["indexed_vectors"] in (0, 2000)
    assert "nn_distance_filler" in report["sizes"]["items_2000"]
    # A second run loads every index from the cache and reports the first build's seconds.
    again = qe.run_engines(real, queries, [2000], ["faiss-hnsw", "edge-float"], params, sigma=0.3, timed=60,
                           cache=tmp_path / "engines")
    for engine in ("faiss-hnsw", "edge-float"):
        first, second = report["search"][engine]["items_2000"], again["search"][engine]["items_2000"]
        assert second["build_s"] == first["build_s"] and second["load_s"] is not None
        assert second["recall@10"] == first["recall@10"]
