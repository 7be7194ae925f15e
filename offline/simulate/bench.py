"""Re-rank latency: ``LightGBMReranker.rerank_with_info`` of ``candidates`` SIMULATED visual
candidates, **the feature read through the Feast online store included**, per online store.

Per store (``redis``, ``sqlite``): a short simulated loop (``days`` × ``queries_per_day`` searches)
runs over ``offline.simulate.feast_store.FeastFeatures`` on that store (events → the aggregator →
Feast), trains and activates a model; then ``calls`` re-ranks (after ``warmup`` untimed ones) of
the same candidate lists through ``LightGBMReranker(reader=ItemFeatureStore)``: one
``ItemFeatureStore.online`` read (one ``OnlineStore.online_read`` of the vector view), the request
features, one ``Booster.predict`` on an (n, 34) float32 matrix with ``num_threads=1``, ``arrange``.
``memory``: the same model over an ``InMemoryFeatureReader`` holding the same features (the cost
without a store). The calls are timed in ``rounds`` rounds, the stores taking turns, so a burst of
load on a shared machine falls on all of them; the read alone (``online`` of the same ids) is timed
in the same rounds. A Redis project of its own is deleted afterwards (``redis_keys_left``).

``predict`` on a small matrix has a fixed cost (parameter parsing, the ctypes call) that dominates
at 60 rows; the C API's single-row fast path (``LGBM_BoosterPredictForMatSingleRowFast``) would pay
it 60 times instead of once, so the matrix call is the fast path for a whole candidate list.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from offline.simulate.catalog import simulate_offers, synthetic_products
from offline.simulate.feast_store import DEFAULT_REDIS_URL, FeastFeatures
from offline.simulate.loop import STORE_FEATURES, LoopConfig, run_loop
from offline.simulate.search import SimulatedVisualSearch
from offline.simulate.shoppers import daily_queries
from rerank.features import InMemoryFeatureReader
from rerank.registry import ModelRegistry
from rerank.reranker import LightGBMReranker

STORES = ("redis", "sqlite", "memory")
TARGET_P99_MS = 5.0


def redis_ping(url: str) -> str | None:
    """None when Redis at ``url`` answers, else why not."""
    import redis

    client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
    try:
        client.ping()
        return None
    except redis.exceptions.RedisError as e:
        return f"no Redis at {url} ({e})"
    finally:
        client.close()


def _redis_keys(url: str, project: str) -> int:
    import redis

    client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
    try:
        return sum(1 for _ in client.scan_iter(match=b"*" + project.encode(), count=1000))
    finally:
        client.close()


def _stats(ms: np.ndarray) -> dict[str, float]:
    return {"p50_ms": round(float(np.percentile(ms, 50)), 4), "p99_ms": round(float(np.percentile(ms, 99)), 4),
            "max_ms": round(float(ms.max()), 4), "mean_ms": round(float(ms.mean()), 4)}


def bench_rerank(*, calls: int = 500, candidates: int = 60, warmup: int = 50, seed: int = 0,
                 stores: tuple[str, ...] = STORES, redis_url: str = DEFAULT_REDIS_URL, rounds: int = 5,
                 days: int = 2, queries_per_day: int = 300, workdir: str | Path | None = None,
                 samples: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """The benchmark (module doc). ``samples``: filled with each store's per-call milliseconds (the plot)."""
    unknown = set(stores) - set(STORES)
    if unknown or not stores:
        raise ValueError(f"stores {sorted(unknown) or '()'}: expected some of {', '.join(STORES)}")
    if "redis" in stores and (why := redis_ping(redis_url)) is not None:
        raise RuntimeError(f"{why}: start Redis, or leave it out (--stores sqlite,memory)")
    products = synthetic_products(n_categories=24, per_category=4)
    offers = simulate_offers(products, seed=seed)
    search = SimulatedVisualSearch(offers, seed=seed, candidate_k=candidates)
    config = LoopConfig(days=days, queries_per_day=queries_per_day, seed=seed)
    queries = daily_queries(products, days + 1, calls + warmup, seed=seed)
    lists = [search(q) for q in queries]
    every_id = [o.item_id for o in offers]
    rerankers: dict[str, LightGBMReranker] = {}
    readers: dict[str, Any] = {}
    training: dict[str, Any] = {}
    projects: dict[str, str] = {}
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()) if workdir is None else workdir)
        feast_stores = [s for s in stores if s != "memory"] or ["sqlite"]
        for kind in feast_stores:
            features = FeastFeatures(offers, config, online=kind, redis_url=redis_url,
                                     data_dir=tmp / f"features-{kind}")
            stack.callback(features.close)
            projects[kind] = features.settings.project
            models = tmp / f"models-{kind}"
            t0 = time.perf_counter()
            report = run_loop(products, offers, search, models, config=config, features=features)
            registry = ModelRegistry(models)
            version = registry.active_version()
            text = (models / str(version) / "model.txt").read_text(encoding="utf-8")
            training[kind] = {"loop_s": round(time.perf_counter() - t0, 2), "model": version,
                              "model_sha256": hashlib.sha256(text.encode()).hexdigest(),
                              "feature_store": report["feature_store"]}
            readers[kind] = features.store
            rerankers[kind] = LightGBMReranker(features.store, store_features=STORE_FEATURES, registry=registry)
        if "memory" in stores:
            source = feast_stores[0]
            readers["memory"] = InMemoryFeatureReader(readers[source].online(every_id))
            rerankers["memory"] = LightGBMReranker(readers["memory"], store_features=STORE_FEATURES,
                                                   registry=ModelRegistry(tmp / f"models-{source}"))
        # the same features from every store (the one model would then be trained everywhere)
        answers = {k: readers[k].online(every_id) for k in stores}
        first = answers[stores[0]]
        same_features = all(a == first for a in answers.values())
        known = len(first) / len(every_id)

        for kind in stores:
            for hits in lists[:warmup]:
                rerankers[kind].rerank_with_info(hits)
        timed = lists[warmup:]
        chunks = np.array_split(np.arange(len(timed)), max(1, min(rounds, len(timed))))
        total = {k: np.empty(len(timed)) for k in stores}
        read = {k: np.empty(len(timed)) for k in stores}
        for chunk in chunks:
            for kind in stores:
                reranker, reader = rerankers[kind], readers[kind]
                for n in chunk:
                    hits = timed[n]
                    t0 = time.perf_counter_ns()
                    result = reranker.rerank_with_info(hits)
                    t1 = time.perf_counter_ns()
                    reader.online([h.item_id for h in hits])
                    t2 = time.perf_counter_ns()
                    if result.fallback_reason is not None:
                        raise RuntimeError(f"{kind}: the benchmark fell back to visual order: {result.fallback_reason}")
                    total[kind][n] = (t1 - t0) / 1e6
                    read[kind][n] = (t2 - t1) / 1e6
        by_store: dict[str, Any] = {}
        for kind in stores:
            reads = _stats(read[kind])
            by_store[kind] = {**_stats(total[kind]), "read_p50_ms": reads["p50_ms"], "read_p99_ms": reads["p99_ms"],
                              "model": rerankers[kind].active_version,
                              "reader": type(readers[kind]).__name__ + (".online" if kind != "memory" else "")}
            if samples is not None:
                samples[kind] = total[kind].copy()
        features_count = len(rerankers[stores[0]].feature_names)
    # the ExitStack closed every FeastFeatures: its project's Redis keys and tables are deleted
    keys_left = _redis_keys(redis_url, projects["redis"]) if "redis" in projects else None
    head = "redis" if "redis" in stores else stores[0]
    shas = {t["model_sha256"] for t in training.values()}
    return {
        "simulated": True,
        "note": "SIMULATED candidates and features (offline.simulate); latency of the real re-ranker and Feast stores",
        "candidates": candidates, "calls": len(timed), "warmup": warmup, "rounds": len(chunks),
        "feature_store": head, "p50_ms": by_store[head]["p50_ms"], "p99_ms": by_store[head]["p99_ms"],
        "target_p99_ms": TARGET_P99_MS, "meets_target": by_store[head]["p99_ms"] <= TARGET_P99_MS,
        "features": features_count, "by_store": by_store,
        "same_features_across_stores": same_features, "same_model_across_stores": len(shas) == 1,
        "items_known": round(known, 4), "catalog": {"products": len(products), "offers": len(offers)},
        "training": {"days": days, "queries_per_day": queries_per_day, **training},
        "redis": {"url": redis_url, "project": projects.get("redis"), "keys_left": keys_left} if "redis" in stores else None,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "processor": platform.processor()
                    or platform.machine()},
    }


def plot_latency(samples: dict[str, np.ndarray], path: str | Path, *, candidates: int = 60) -> Path:
    """Histograms of the per-call re-rank time per store, with the 5 ms target (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=120)
    top = max(float(np.percentile(v, 99.9)) for v in samples.values())
    bins = np.linspace(0.0, max(top, TARGET_P99_MS) * 1.05, 80)
    for kind, ms in samples.items():
        ax.hist(np.clip(ms, 0, bins[-1]), bins=bins, histtype="step", linewidth=1.4,
                label=f"{kind}: p50 {np.percentile(ms, 50):.2f}, p99 {np.percentile(ms, 99):.2f} ms")
    ax.axvline(TARGET_P99_MS, color="k", linestyle=":", label=f"target p99 {TARGET_P99_MS:g} ms")
    ax.set_xlabel(f"re-rank of {candidates} candidates, feature read included (ms)")
    ax.set_ylabel("calls")
    ax.set_title("SIMULATED candidates: re-rank latency by online store")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def table(result: dict[str, Any]) -> str:
    """The printed summary."""
    lines = [f"re-rank of {result['candidates']} SIMULATED candidates, feature read included "
             f"({result['calls']} calls per store after {result['warmup']} warm-up, {result['rounds']} rounds)",
             f"{'store':<8} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'read p50':>9} {'read p99':>9}"]
    for kind, s in result["by_store"].items():
        lines.append(f"{kind:<8} {s['p50_ms']:>8.3f} {s['p99_ms']:>8.3f} {s['max_ms']:>8.3f} "
                     f"{s['read_p50_ms']:>9.3f} {s['read_p99_ms']:>9.3f}")
    verdict = "met" if result["meets_target"] else "MISSED"
    lines.append(f"target p99 <= {result['target_p99_ms']:g} ms on {result['feature_store']}: {verdict}")
    return "\n".join(lines)


__all__ = ["STORES", "TARGET_P99_MS", "bench_rerank", "plot_latency", "redis_ping", "table"]
