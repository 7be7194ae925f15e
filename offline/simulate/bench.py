"""Re-rank latency: ``LightGBMReranker.rerank`` of ``candidates`` visual candidates, the feature
read included (the in-memory reader here: the Feast online store adds its own read time), over
``calls`` requests of SIMULATED candidates, after a model is trained on a short simulated loop.

Per call: one ``online`` read, the request features, one ``Booster.predict`` on an (n, 34) float32
matrix with ``num_threads=1``, and ``arrange``. ``predict`` on a small matrix has a fixed cost
(parameter parsing, the ctypes call) that dominates at 60 rows; the single-row fast path of the C
API (``LGBM_BoosterPredictForMatSingleRowFast``) would pay it 60 times instead of once, so the
matrix call is the fast path for a whole candidate list.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from offline.simulate.catalog import simulate_offers, synthetic_products
from offline.simulate.loop import STORE_FEATURES, FeatureAggregator, LoopConfig, run_loop
from offline.simulate.search import SimulatedVisualSearch
from offline.simulate.shoppers import daily_queries
from rerank.features import InMemoryFeatureReader
from rerank.registry import ModelRegistry
from rerank.reranker import LightGBMReranker


def bench_rerank(*, calls: int = 1000, candidates: int = 60, warmup: int = 50, seed: int = 0,
                 workdir: str | Path | None = None) -> dict[str, Any]:
    """p50/p99/max of one re-rank in milliseconds (module doc)."""
    products = synthetic_products(n_categories=24, per_category=4)
    offers = simulate_offers(products, seed=seed)
    search = SimulatedVisualSearch(offers, seed=seed, candidate_k=candidates)
    with tempfile.TemporaryDirectory() if workdir is None else _keep(workdir) as tmp:
        models = Path(tmp) / "models"
        config = LoopConfig(days=2, queries_per_day=400, seed=seed)
        run_loop(products, offers, search, models, config=config)
        reader = InMemoryFeatureReader(FeatureAggregator(offers, config).rows())
        reranker = LightGBMReranker(reader, store_features=STORE_FEATURES, registry=ModelRegistry(models))
        queries = daily_queries(products, 99, calls + warmup, seed=seed)
        lists = [search(q) for q in queries]
        for hits in lists[:warmup]:
            reranker.rerank(hits)
        times = np.empty(calls)
        for n, hits in enumerate(lists[warmup:]):
            t0 = time.perf_counter_ns()
            result = reranker.rerank_with_info(hits)
            times[n] = (time.perf_counter_ns() - t0) / 1e6
            if result.fallback_reason is not None:
                raise RuntimeError(f"the benchmark fell back to visual order: {result.fallback_reason}")
        return {
            "simulated": True, "calls": calls, "candidates": candidates,
            "features": len(reranker.feature_names), "model": reranker.active_version,
            "p50_ms": float(np.percentile(times, 50)), "p99_ms": float(np.percentile(times, 99)),
            "max_ms": float(times.max()), "mean_ms": float(times.mean()),
        }


class _keep:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __enter__(self) -> str:
        self.path.mkdir(parents=True, exist_ok=True)
        return str(self.path)

    def __exit__(self, *exc: object) -> None:
        return None
