"""The loop's item features through the REAL feature store: ``feature_store.store.ItemFeatureStore``
(Feast 0.67, SQLite or Redis online, Parquet offline) fed by ``feature_store.aggregator.
ItemFeatureAggregator`` with the events a deployment would send, and read by the re-ranker through
``ItemFeatureStore.online`` (the serving path). Nothing of the simulator's own aggregator reaches
the model's features; it only draws what the simulated marketplace does outside the search
(reviews, orders from other surfaces) and keeps the running rating of each offer.

Events, per simulated day (all in simulated time: the store's and the aggregator's clock is a
``SimClock``):

* before day 0, through ``feature_store.backfill.backfill`` (a JSONL file, replayed in chunks, then
  ``refresh``): an ``ItemProfileUpdated`` per offer when it was listed (``age_days`` before day 0:
  category ``top/category``, price, shop, rating count, shop score), its baseline
  ``ItemFeaturesUpdated`` (no counts, its rating) at the later of its listing and 30 days before
  day 0, and an absolute snapshot at the end of each history day with orders (``sales_history``;
  orders before the offer was listed are dropped);
* each day: a ``ResultsShown`` per search (the shown offers, their positions and visual scores),
  a ``ResultEngaged`` per click / add-to-cart / order (an order's amount: the offer's price), then
  at the end of the day an ``ItemFeaturesUpdated`` (cumulative orders and sales from the other
  surfaces, the running rating) per offer whose counters or rating moved and an
  ``ItemProfileUpdated`` per offer whose rating count or shop score moved; one ``ingest`` batch,
  then ``refresh`` as of the end of the day (the windows slide, as the consumer's hourly refresh
  makes them).

``shop_score`` is the shop's mean rating mapped to 0..1 (``(r - 1) / 4``, the event's range).
``row_resolution_s`` (``AggregatorSettings``, at most 3600) coalesces an item's behaviour rows;
the online row an item serves is its newest either way.
"""

from __future__ import annotations

import shutil
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from offline.simulate.catalog import SimOffer
from offline.simulate.loop import DayLog, FeatureAggregator, LoopConfig
from offline.simulate.shoppers import DAY_SECONDS, EPOCH, IMPRESSION, ORDER

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/15"


class SimClock:
    """Simulated unix seconds, set by the loop (the store's TTLs and ages, the aggregator's horizon)."""

    def __init__(self, now: float = EPOCH) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def store_settings(online: str, data_dir: str | Path, *, project: str | None = None,
                   redis_url: str = DEFAULT_REDIS_URL):
    """``FeatureStoreSettings`` for ``online`` (``sqlite`` | ``redis``) in ``data_dir``, a project of
    its own (the Redis keys end with it; ``FeastFeatures.close`` deletes them)."""
    from feature_store.settings import FeatureStoreSettings, RedisOnlineSettings, SqliteOnlineSettings

    project = project or f"sim_{uuid.uuid4().hex[:10]}"
    if online == "redis":
        return FeatureStoreSettings(data_dir=Path(data_dir), project=project, online=RedisOnlineSettings(url=redis_url),
                                    registry_cache_ttl_seconds=0)
    if online == "sqlite":
        return FeatureStoreSettings(data_dir=Path(data_dir), project=project, online=SqliteOnlineSettings(),
                                    registry_cache_ttl_seconds=0)
    raise ValueError(f"online store {online!r}: expected sqlite or redis")


class FeastFeatures:
    """A ``loop.FeatureBackend`` over ``ItemFeatureStore`` + ``ItemFeatureAggregator`` (module doc).

    ``online``: ``sqlite`` (a file in ``data_dir``) or ``redis`` (``redis_url``, a fresh project).
    ``data_dir``: registry, Parquet, SQLite files (default: a temporary directory, removed by
    ``close``). ``close`` also deletes the project's online data (``teardown``: its Redis keys)."""

    def __init__(self, offers: Sequence[SimOffer], config: LoopConfig, *, online: str = "sqlite",
                 data_dir: str | Path | None = None, redis_url: str = DEFAULT_REDIS_URL,
                 row_resolution_s: float = 3600.0, project: str | None = None):
        from feature_store.aggregator import ItemFeatureAggregator
        from feature_store.settings import AggregatorSettings
        from feature_store.store import ItemFeatureStore

        self.offers = {o.item_id: o for o in offers}
        self.online_kind = online
        self.row_resolution_s = row_resolution_s
        self._tmp = None if data_dir is not None else tempfile.mkdtemp(prefix="tongkuan-sim-feast-")
        self.data_dir = Path(data_dir if data_dir is not None else self._tmp)  # type: ignore[arg-type]
        self.settings = store_settings(online, self.data_dir, project=project, redis_url=redis_url)
        self.clock = SimClock(EPOCH)
        self.store = ItemFeatureStore(self.settings, clock=self.clock)
        self.store.apply()
        self.aggregator = ItemFeatureAggregator(
            self.store, AggregatorSettings(row_resolution_s=row_resolution_s), clock=self.clock)
        self.reader = self.store
        # what the marketplace does outside the search (reviews, other surfaces' orders): drawn by
        # the simulator's aggregator exactly as in the in-memory loop; its rows are never read
        self.market = FeatureAggregator(offers, config)
        self._orders = dict.fromkeys(self.offers, 0)    # cumulative other-surface orders per offer
        self._sales = dict.fromkeys(self.offers, 0.0)
        self._rating: dict[str, float | None] = {}
        self._profile: dict[str, tuple[int, float | None]] = {}  # (rating count, shop score) last sent
        self.stats: dict[str, Any] = {"inputs": 0, "rows_offline": 0, "rows_online": 0, "refreshed_rows": 0,
                                      "ingest_s": 0.0, "backfill_s": 0.0, "rejected": 0}
        self._closed = False

    # -- the loop's side -----------------------------------------------------------------------

    def start(self) -> None:
        """The catalog and its 30 days of history, through the backfill path (module doc)."""
        from events.models import ItemCounters, ItemFeaturesUpdated
        from feature_store.backfill import backfill
        from feature_store.inputs import ItemProfileUpdated, dumps

        ratings, shops = self.market.ratings()
        lines: list[bytes] = []
        history = 30 * DAY_SECONDS
        for item_id, o in self.offers.items():
            listed = EPOCH - o.age_days * DAY_SECONDS
            count, score = self.market.rating_n[item_id], _shop_score(shops.get(o.shop))
            lines.append(dumps(ItemProfileUpdated(item_id=item_id, event_time=listed, category=f"{o.top}/{o.category}",
                                                  price=o.price, shop=o.shop, rating_count=count, shop_score=score)))
            self._profile[item_id] = (count, score)
            rating = ratings[item_id]
            self._rating[item_id] = rating
            base = max(listed, EPOCH - history - 1.0)
            lines.append(dumps(ItemFeaturesUpdated(item_id=item_id, event_time=base,
                                                   counters=ItemCounters(rating=_clip_rating(rating)))))
            days = o.sales_history[-30:]
            for k, n in enumerate(days):
                end = EPOCH - (len(days) - 1 - k) * DAY_SECONDS - 1.0  # the end of that history day
                if n <= 0 or end <= base:
                    continue
                self._orders[item_id] += n
                self._sales[item_id] += n * o.price
                lines.append(dumps(ItemFeaturesUpdated(item_id=item_id, event_time=end, counters=ItemCounters(
                    orders=self._orders[item_id], sales=round(self._sales[item_id], 2), rating=_clip_rating(rating)))))
        path = self.data_dir / "history.jsonl"
        path.write_bytes(b"\n".join(lines) + b"\n")
        self.clock.now = EPOCH
        t0 = time.perf_counter()
        got = backfill(self.aggregator, path)
        self.stats["backfill_s"] = round(time.perf_counter() - t0, 3)
        self.stats["history_inputs"] = got.inputs
        self.stats["inputs"] += got.inputs
        self.stats["rows_offline"] += got.rows
        self.stats["refreshed_rows"] += got.refreshed
        if got.rejections:
            raise RuntimeError(f"the feature store refused simulated history: {got.summary()}")

    def end_of_day(self, day: int, log: DayLog) -> None:
        from events.models import ItemCounters, ItemFeaturesUpdated
        from feature_store.inputs import ItemProfileUpdated, ResultEngaged, ResultsShown

        self.market.end_of_day(day, log.events)
        inputs: list[Any] = []
        shown: dict[str, list[tuple[int, str, float]]] = defaultdict(list)
        times: dict[str, float] = {}
        if len(log.rows):
            for rid, t, item, pos, score in log.rows[["request_id", "request_time", "item_id", "position",
                                                       "visual_score"]].itertuples(index=False):
                shown[rid].append((int(pos), item, float(score)))
                times[rid] = float(t)
        for rid, entries in shown.items():
            entries.sort()
            inputs.append(ResultsShown(
                event_id=f"shown:{rid}", request_id=rid, query_id=rid, event_time=times[rid],
                item_ids=tuple(i for _, i, _ in entries), positions=tuple(p for p, _, _ in entries),
                scores=tuple(s for _, _, s in entries), model_version="simulated-visual", ranker_version=log.ranker))
        for e in log.events:
            if e.kind == IMPRESSION:
                continue
            inputs.append(ResultEngaged(
                event_id=f"{e.kind}:{e.request_id}:{e.position}", request_id=e.request_id, kind=e.kind,
                item_id=e.item_id, event_time=e.time, amount=self.offers[e.item_id].price if e.kind == ORDER else None))
        end = EPOCH + (day + 1) * DAY_SECONDS
        ratings, shops = self.market.ratings()
        for item_id, o in self.offers.items():
            other = self.market.other_orders.get(item_id, 0)
            rating = ratings[item_id]
            if other or rating != self._rating.get(item_id):
                self._orders[item_id] += other
                self._sales[item_id] += other * o.price
                self._rating[item_id] = rating
                inputs.append(ItemFeaturesUpdated(item_id=item_id, event_time=end - 1.0, counters=ItemCounters(
                    orders=self._orders[item_id], sales=round(self._sales[item_id], 2), rating=_clip_rating(rating))))
            profile = (self.market.rating_n[item_id], _shop_score(shops.get(o.shop)))
            if profile != self._profile.get(item_id):
                self._profile[item_id] = profile
                inputs.append(ItemProfileUpdated(item_id=item_id, event_time=end - 1.0, rating_count=profile[0],
                                                 shop_score=profile[1]))
        # "now" at ingest: the end of the day, or the day's latest event (an order can follow its
        # search by an hour: it would otherwise be refused as in_future)
        self.clock.now = max([end, *(e.event_time for e in inputs)])
        t0 = time.perf_counter()
        got = self.aggregator.ingest(inputs)
        refreshed = self.aggregator.refresh()
        self.stats["ingest_s"] += time.perf_counter() - t0
        self.stats["inputs"] += len(inputs)
        self.stats["rows_offline"] += got.rows
        self.stats["rows_online"] += got.online_rows
        self.stats["refreshed_rows"] += refreshed
        if got.rejections or got.duplicates:
            reasons = sorted({r.reason for r in got.rejections})
            raise RuntimeError(f"the feature store refused {len(got.rejections)} simulated inputs ({reasons}) "
                               f"and took {got.duplicates} as duplicates on day {day}")

    def describe(self) -> dict[str, Any]:
        stats = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in self.stats.items()}
        return {"backend": "feast", "online_store": self.online_kind,
                "reader": "feature_store.store.ItemFeatureStore.online (vector view, one OnlineStore.online_read)",
                "writer": "feature_store.aggregator.ItemFeatureAggregator.ingest (ResultsShown, ResultEngaged, "
                          "ItemFeaturesUpdated, ItemProfileUpdated) + refresh; history via feature_store.backfill",
                "row_resolution_s": self.row_resolution_s, "project": self.settings.project, **stats}

    # -- clean-up ------------------------------------------------------------------------------

    def close(self) -> None:
        """Delete the project's online data (Redis keys, SQLite tables) and registry; remove the
        temporary data dir. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self.aggregator.close()
        finally:
            try:
                self.store.teardown()
            finally:
                if self._tmp is not None:
                    shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> FeastFeatures:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _shop_score(mean_rating: float | None) -> float | None:
    return None if mean_rating is None else min(1.0, max(0.0, (mean_rating - 1.0) / 4.0))


def _clip_rating(rating: float | None) -> float | None:
    return None if rating is None else round(min(5.0, max(0.0, rating)), 4)


__all__ = ["DEFAULT_REDIS_URL", "FeastFeatures", "SimClock", "store_settings"]
