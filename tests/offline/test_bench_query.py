"""``make bench-query`` at a tiny scale: a copy of the grocery catalog with 440 train photos (indexed
items, with random vectors: the filler's noise needs at least as many real vectors as dimensions) and
8 val photos (queries, through the model), 81 and 2,000 items (the latter mostly filler), a few timed
queries, one short load step through the API in another process, two search-only engines. Checks
the report's keys and that its figures are positive; everything lives under ``tmp_path``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from offline.bench import query as bq
from offline.bench import query_engines as qe


def test_filler_anchors_are_the_rows_the_filler_is_drawn_around() -> None:
    rng = np.random.default_rng(5)
    real = rng.standard_normal((50, 16)).astype(np.float32)
    real /= np.linalg.norm(real, axis=1, keepdims=True)
    anchors = bq.filler_anchors(len(real), 450, chunk=200)
    np.testing.assert_allclose(qe.filler(real, 450, 0.0, chunk=200), real[anchors], atol=1e-6)  # sigma 0: the anchor


def _small_dataset(src: Path, dst: Path, train: int = 440, val: int = 8) -> Path:
    """The catalog (all 81 products) and every n-th train/val photo, in the GroceryStore layout."""
    s, d = src / "dataset", dst / "dataset"
    d.mkdir(parents=True)
    shutil.copy(s / "classes.csv", d / "classes.csv")
    shutil.copytree(s / bq.GroceryDataset(src).catalog_dir.name, d / bq.GroceryDataset(src).catalog_dir.name)
    for split, n in (("train", train), ("val", val)):
        lines = [ln for ln in (s / f"{split}.txt").read_text().splitlines() if ln.strip()]
        keep = lines[:: max(1, len(lines) // n)][:n]
        for ln in keep:
            rel = ln.split(",")[0].strip()
            (d / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(s / rel, d / rel)
        (d / f"{split}.txt").write_text("\n".join(keep) + "\n")
    return dst


def _seed_embeddings(cache: Path, data: Path) -> None:
    """Random unit vectors in the embedding cache for the indexed items and the engines' queries (the
    bench's own queries still go through the model): no minute spent embedding 521 pictures."""
    from index.factory import model_slug
    from tongkuan.config import ToolConfig, load
    from vision.registry import ModelRegistry

    runtime = load(ToolConfig).runtime
    entry, _ = ModelRegistry(runtime.model_dir).resolve(runtime.model)
    ds = bq.GroceryDataset(data)
    where = cache / "embeddings" / model_slug(entry.model_id)
    where.mkdir(parents=True)
    rng = np.random.default_rng(7)
    for name, n in (("catalog", len(ds.products)), ("train", len(ds.split("train"))),
                    ("val-queries", len(ds.split("val")))):
        x = rng.standard_normal((n, entry.dim)).astype(np.float32)
        np.save(where / f"{name}.npy", x / np.linalg.norm(x, axis=1, keepdims=True))


@pytest.mark.usefixtures("model_dir")
def test_bench_query_reports_every_key_at_a_small_scale(grocery, tmp_path) -> None:
    data = _small_dataset(grocery, tmp_path / "grocery")
    out, cache = tmp_path / "reports" / "bench-query.json", tmp_path / "cache"
    _seed_embeddings(cache, data)
    common = ["--data", str(data), "--split", "val", "--sizes", "81,2000", "--sigma", "0.4", "--timed", "20",
              "--cache", str(cache), "--out", str(out)]
    assert bq.main([*common, "--qps-steps", "5", "--qps-step-s", "3", "--engines", "exact,edge-int8",
                    "--engine-timed", "30"]) == 0
    report = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 0
    for size in ("items_81", "items_2000"):
        e2e = report["e2e"][size]
        assert 0 < e2e["p50_ms"] <= e2e["p99_ms"] and e2e["timed_queries"] == 20
        for stage in ("decode", "embed", "search", "index", "vote"):
            assert e2e["stages"][stage]["p50_ms"] > 0, (size, stage)
        assert e2e["stages"]["rerank"]["absent"] is True
        assert e2e["stages"]["index"]["p50_ms"] <= e2e["stages"]["search"]["p50_ms"] <= e2e["p50_ms"]
        assert report["build"][size]["items"] == int(size.split("_")[1]) and report["build"][size]["build_s"] > 0
        for engine in ("exact", "edge-int8"):
            row = report["search"][engine][size]
            assert 0 < row["p50_ms"] <= row["p99_ms"] and 0 < row["recall@10"] <= 1
    assert sum(report["build"]["items_2000"]["shards"].values()) == 2000  # filler inherits its anchor's shard
    (step,) = report["qps"]["items_2000"]["steps"]
    assert step["requests"] == 15 and step["achieved_qps"] > 0 and step["errors"] == 0, step
    assert report["qps_at_p99_100ms"] >= 0  # 0 when this busy machine answers 5/s slower than 100 ms p99
    assert report["qps_at_p99_100ms"] in (0.0, step["achieved_qps"])

    # Again: the indexes are reopened from the cache, with the first build's figures.
    assert bq.main([*common, "--qps-steps", "", "--engines", "none"]) == 0
    again = json.loads(out.read_text())
    assert again["build"]["items_2000"]["load_s"] is not None
    assert again["build"]["items_2000"]["build_s"] == report["build"]["items_2000"]["build_s"]
    assert "qps_at_p99_100ms" not in again and "search" not in again
