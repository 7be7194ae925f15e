"""Measurements behind ``docs/feature-store.md``: the online read of a re-rank request (60 items)
by each read path, and how long an interaction takes to become an online feature.

``bench_online``: ``population`` items pushed (both views), then ``calls`` reads of ``n_items``
random ones per path (``online``: the vector view through ``Provider.online_read``;
``online_views``: the two named views through it; ``online_via_feast``: ``get_online_features``), with
``rank=True`` also a LightGBM ranker's ``predict`` on the 60 × ``len(FEATURES)`` matrix right after
the vector read (feature read + ranking, the re-rank budget).

``bench_offline_write``: the cost of one offline push (one row) as the view's Parquet file grows:
Feast's file store reads the whole file and writes it back on every push.

``bench_freshness``: a consumer thread (``FeatureStoreConsumer.run`` on an in-memory bus, its own
``ItemFeatureStore``, as in its own process) while this thread publishes click events one at a
time and polls the online store through another ``ItemFeatureStore`` until the click shows in
``clicks_1d``: event time → visible, per event.
"""

from __future__ import annotations

import random
import statistics
import threading
import time
import uuid
from collections.abc import Callable

from feature_store.features import BEHAVIOUR_FEATURES, FEATURES, INTEGER_FEATURES, PROFILE_STORED


def _stats(samples_s: list[float]) -> dict[str, float]:
    xs = sorted(samples_s)
    p99 = xs[min(len(xs) - 1, max(0, int(round(0.99 * len(xs))) - 1))]
    return {"median_ms": round(statistics.median(xs) * 1e3, 3), "p99_ms": round(p99 * 1e3, 3),
            "max_ms": round(xs[-1] * 1e3, 3), "n": len(xs)}


def seed(store, population: int, now: float | None = None) -> list[str]:
    """Push ``population`` items with every feature set (both views). Returns their ids."""
    now = time.time() if now is None else now
    rng = random.Random(7)
    ids = [f"bench-{k}" for k in range(population)]
    behaviour = [{"item_id": i, "event_timestamp": now - 60,
                  **{f: (rng.randint(0, 500) if f in INTEGER_FEATURES else rng.random()) for f in BEHAVIOUR_FEATURES}}
                 for i in ids]
    profile = [{"item_id": i, "event_timestamp": now - 60, **{f: rng.random() * 100 for f in PROFILE_STORED},
                "first_seen_at": now - rng.random() * 1e7} for i in ids]
    for start in range(0, population, 1000):
        store.push("item_behaviour", behaviour[start:start + 1000])
        store.push("item_profile", profile[start:start + 1000])
    return ids


def _ranker():
    import lightgbm as lgb
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.random((2000, len(FEATURES) + 1))
    y = rng.integers(0, 4, 2000)
    model = lgb.LGBMRanker(n_estimators=200, num_leaves=31, verbose=-1, n_jobs=1)
    model.fit(x, y, group=[20] * 100)
    return model.booster_, np


def bench_online(store, *, n_items: int = 60, calls: int = 300, population: int = 5000, rank: bool = True,
                 warmup: int = 20) -> dict:
    ids = seed(store, population)
    rng = random.Random(11)
    requests = [rng.sample(ids, n_items) for _ in range(calls + warmup)]
    paths: dict[str, Callable] = {"online (vector view, 1 OnlineStore.online_read)": store.online,
                                  "online_views (named views, 2 OnlineStore.online_read)": store.online_views,
                                  "online_via_feast (get_online_features)": store.online_via_feast}
    out: dict = {"items_per_read": n_items, "calls": calls, "population": population, "paths": {}}
    for name, read in paths.items():
        samples = []
        for k, req in enumerate(requests):
            t0 = time.perf_counter()
            read(req)
            if k >= warmup:
                samples.append(time.perf_counter() - t0)
        out["paths"][name] = _stats(samples)
    if rank:
        booster, np = _ranker()
        samples, rank_only = [], []
        for k, req in enumerate(requests):
            t0 = time.perf_counter()
            feats = store.online(req)
            t1 = time.perf_counter()
            x = np.array([[1.0] + [np.nan if (v := feats.get(i, {}).get(f)) is None else v for f in FEATURES]
                          for i in req], dtype=np.float64)
            booster.predict(x, num_threads=1)
            t2 = time.perf_counter()
            if k >= warmup:
                samples.append(t2 - t0)
                rank_only.append(t2 - t1)
        out["paths"]["online + LightGBM predict (200 trees, 60 rows)"] = _stats(samples)
        out["paths"]["LightGBM predict alone"] = _stats(rank_only)
    return out


def bench_offline_write(store, sizes: tuple[int, ...] = (10_000, 100_000, 1_000_000), tries: int = 5) -> dict:
    from feast.data_source import PushMode

    now, total, out = time.time(), 0, {}
    row = dict.fromkeys(BEHAVIOUR_FEATURES, 1)
    for size in sizes:
        for start in range(total, size, 200_000):
            n = min(200_000, size - start)
            store.push("item_behaviour", [{"item_id": f"w{start + j}", "event_timestamp": now - j, **row}
                                          for j in range(n)], to=PushMode.OFFLINE)
        total = size
        samples = []
        for _ in range(tries):
            t0 = time.perf_counter()
            store.push("item_behaviour", [{"item_id": "w", "event_timestamp": now, **row}], to=PushMode.OFFLINE)
            samples.append(time.perf_counter() - t0)
        out[str(size)] = _stats(samples)
    return {"one_row_offline_push_by_file_rows": out}


def bench_freshness(writer_store, reader_store, aggregator_factory, *, events: int = 200,
                    gap_s: float = 0.02, timeout_s: float = 5.0) -> dict:
    """``aggregator_factory(writer_store)`` builds the consumer side's aggregator."""
    from events.bus import InMemoryBus
    from feature_store.consumer import FeatureConsumerSettings, FeatureStoreConsumer
    from feature_store.inputs import INTERACTIONS_TOPIC, ResultEngaged, dumps

    bus = InMemoryBus(partitions=1)
    bus.create_topic(INTERACTIONS_TOPIC)
    settings = FeatureConsumerSettings(topics=(INTERACTIONS_TOPIC,), max_batch=500)
    aggregator = aggregator_factory(writer_store)
    consumer = FeatureStoreConsumer(bus.consumer([INTERACTIONS_TOPIC], "bench"), aggregator, bus.producer(),
                                    settings)
    thread = threading.Thread(target=consumer.run, daemon=True)
    thread.start()
    producer = bus.producer()
    item = f"fresh-{uuid.uuid4().hex[:8]}"
    latencies, misses = [], 0
    try:
        for k in range(events):
            t0 = time.time()
            event = ResultEngaged(event_id=uuid.uuid4().hex, request_id="bench", kind="click", item_id=item,
                                  event_time=t0)
            producer.publish(INTERACTIONS_TOPIC, item, dumps(event))
            producer.flush()
            while True:
                got = reader_store.online([item]).get(item, {}).get("clicks_1d")
                if got is not None and got >= k + 1:
                    latencies.append(time.time() - t0)
                    break
                if time.time() - t0 > timeout_s:
                    misses += 1
                    break
                time.sleep(0.001)
            time.sleep(gap_s)
    finally:
        consumer.stop()
        thread.join(10)
        aggregator.close()
    return {"events": events, "not_visible_within_s": {str(timeout_s): misses},
            "event_to_online_visible": _stats(latencies) if latencies else None}


__all__ = ["bench_freshness", "bench_offline_write", "bench_online", "seed"]
