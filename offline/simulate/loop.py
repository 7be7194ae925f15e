"""The closed loop, SIMULATED: days of searches → impressions → clicks/orders → features →
training → the new ranker serving.

Day ``d``: each query is searched (``search(query) -> list[SearchHit]``, best first: the simulated
visual search or a real one), its candidates' features are read through the ``FeatureReader`` and
logged, the ``LightGBMReranker`` orders them (visual order on day 0: no model yet), twins are
folded into the first of their ``duplicate_of`` group (as ``query.searcher`` does) and the top
``shown`` are shown to the simulated shoppers. At the end of the day the events update the item
features (the ``FeatureBackend``: below), a model is trained on every impression so far (time
holdout) and published to the registry, and activated for the next day.

Per day, for both orders of the same candidates (visual and the day's ranker):

* ``ndcg@10``: gain ``1 + 3 × quality`` for an offer of the photographed product, 0 for any other;
  the ideal is the best ``shown`` of the candidates' twin groups;
* ``product_first_r1``: the first shown offer is of the photographed product;
* ``kendall_tau``: τ-b between the order's scores of the photographed product's offers (visual
  score, or the model's) and their hidden quality, averaged over queries with two or more.

Each also for ``oracle``: the hidden gain as the model's score under the same ordering rule
(``oracle_order``), the most any ranker can reach over these candidates.

The headline figures average the days on which the ranker served (day 1 on). The features come
from a ``FeatureBackend`` (``start`` before day 0, ``end_of_day`` after each day, every read through
its ``reader``): ``MemoryFeatures`` (this module's ``FeatureAggregator``, written into an
``InMemoryFeatureReader`` or any ``reader`` + ``write``) or ``offline.simulate.feast_store.
FeastFeatures`` (the real Feast store fed by the feature store's aggregator with the day's events).
"""

from __future__ import annotations

import json
import math
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd

from index.base import SearchHit as IndexHit
from offline.simulate.catalog import SimOffer, SimProduct
from offline.simulate.shoppers import (
    CART,
    CLICK,
    IMPRESSION,
    LABELS,
    ORDER,
    ClickModel,
    SimEvent,
    SimQuery,
    daily_queries,
    simulate_events,
)
from rerank.features import (
    FeatureReader,
    InMemoryFeatureReader,
    candidate_matrix,
    category_vote,
    feature_names,
)
from rerank.ranking_metrics import kendall_tau, mean, ndcg_at_k
from rerank.registry import ModelRegistry
from rerank.reranker import LightGBMReranker
from rerank.training import train

# The feature store's names and order (``feature_store.features.FEATURES``), so the loop's features
# are the ones the Feast store serves; not imported from there while that package is being built
# (tests/offline/test_simulate_loop.py checks that the two agree).
WINDOWS_DAYS = (1, 7, 30)
COUNTERS = ("impressions", "clicks", "add_to_carts", "orders", "sales")
STORE_FEATURES: tuple[str, ...] = (
    *(f"{c}_{w}d" for c in COUNTERS for w in WINDOWS_DAYS),
    "ctr_7d", "ctr_30d", "cvr_7d", "cvr_30d",
    "price", "price_to_category_median", "rating", "rating_count", "shop_score", "item_age_days",
)
TRUTH = "truth_gain"  # the simulator's truth per logged row: evaluation only, never a feature
# the orders every metric is computed for: visual, the day's ranker, and the ceiling (``oracle_order``)
SIDES = ("visual", "ranker", "oracle")

Search = Callable[[SimQuery], Sequence[IndexHit]]
FeatureWriter = Callable[[Mapping[str, Mapping[str, float | None]]], None]


@dataclass(frozen=True)
class LoopConfig:
    days: int = 8
    queries_per_day: int = 400
    shown: int = 10
    holdout_fraction: float = 0.2
    tie_margin: float = 0.02
    num_rounds: int = 200
    use_position: bool = True  # position-bias correction in training (lgb.Dataset(position=...))
    seed: int = 0
    # CTR / CVR smoothing: (clicks + prior_ctr × k) / (impressions + k)
    prior_ctr: float = 0.05
    prior_cvr: float = 0.10
    smoothing: float = 20.0
    review_share: float = 0.3  # an order leaves a review (rating 1 + 4 quality + N(0, 0.8)) this often


class FeatureAggregator:
    """Item features from the catalog and the simulated events, once a simulated day (what the
    feature store's aggregator computes from the same events, in the same names):

    * ``{impressions,clicks,add_to_carts,orders,sales}_{1,7,30}d``: the search's events of the last
      1/7/30 days, plus the orders (and their amount, ``sales``) of the marketplace's other surfaces
      (``SimOffer.sales_history`` before day 0, then Poisson at the offer's past daily mean);
    * ``ctr_W = (clicks_W + m·prior_ctr) / (impressions_W + m)``, ``cvr_W = (orders_W + m·prior_cvr) /
      (clicks_W + m)``;
    * ``price``, ``price_to_category_median`` (of the offers of its coarse category), ``rating`` and
      ``rating_count`` (an order leaves a review ``review_share`` of the time), ``shop_score`` (the
      shop's mean rating), ``item_age_days``.
    """

    def __init__(self, offers: Sequence[SimOffer], config: LoopConfig):
        self.config = config
        self.offers = {o.item_id: o for o in offers}
        longest = max(WINDOWS_DAYS)
        # per item: one dict of counters per day, the newest last (history days first)
        self.days: dict[str, deque] = {}
        for o in offers:
            past = deque(maxlen=longest)
            for n in o.sales_history[-longest:]:
                past.append({"orders": n, "sales": n * o.price})
            self.days[o.item_id] = past
        self.age = {o.item_id: o.age_days for o in offers}
        self.rating_sum = {o.item_id: (o.rating or 0.0) * o.rating_count for o in offers}
        self.rating_n = {o.item_id: o.rating_count for o in offers}
        by_cat: dict[str, list[float]] = {}
        for o in offers:
            by_cat.setdefault(o.category, []).append(o.price)
        self.category_median = {c: float(np.median(v)) for c, v in by_cat.items()}
        self.other_orders: dict[str, int] = {}  # the last simulated day's orders from other surfaces

    def ratings(self) -> tuple[dict[str, float | None], dict[str, float]]:
        """(mean rating per item, None without reviews; mean of its items' ratings per shop)."""
        ratings = {i: (self.rating_sum[i] / n if n else None) for i, n in self.rating_n.items()}
        shop: dict[str, list[float]] = {}
        for i, o in self.offers.items():
            if ratings[i] is not None:
                shop.setdefault(o.shop, []).append(ratings[i])  # type: ignore[arg-type]
        return ratings, {name: float(np.mean(v)) for name, v in shop.items()}

    def rows(self) -> dict[str, dict[str, float | None]]:
        c = self.config
        m = c.smoothing
        ratings, shop = self.ratings()
        out = {}
        for item_id, o in self.offers.items():
            days = list(self.days[item_id])
            row: dict[str, float | None] = {}
            for w in WINDOWS_DAYS:
                recent = days[-w:]
                for counter in COUNTERS:
                    row[f"{counter}_{w}d"] = float(sum(d.get(counter, 0) for d in recent))
            for w in (7, 30):
                row[f"ctr_{w}d"] = (row[f"clicks_{w}d"] + m * c.prior_ctr) / (row[f"impressions_{w}d"] + m)
                row[f"cvr_{w}d"] = (row[f"orders_{w}d"] + m * c.prior_cvr) / (row[f"clicks_{w}d"] + m)
            r = ratings[item_id]
            row.update({
                "price": o.price, "price_to_category_median": o.price / self.category_median[o.category],
                "rating": None if r is None else round(r, 2), "rating_count": float(self.rating_n[item_id]),
                "shop_score": shop.get(o.shop),
                "item_age_days": self.age[item_id],
            })
            out[item_id] = {k: row[k] for k in STORE_FEATURES}
        return out

    def end_of_day(self, day: int, events: Sequence[SimEvent]) -> None:
        rng = np.random.default_rng([self.config.seed, 13, day])
        today: dict[str, dict[str, float]] = {i: {} for i in self.offers}
        key = {IMPRESSION: "impressions", CLICK: "clicks", CART: "add_to_carts", ORDER: "orders"}
        for e in events:
            counts = today[e.item_id]
            counts[key[e.kind]] = counts.get(key[e.kind], 0) + 1
            if e.kind == ORDER:
                counts["sales"] = counts.get("sales", 0.0) + self.offers[e.item_id].price
                if rng.random() < self.config.review_share:
                    q = self.offers[e.item_id].quality
                    self.rating_sum[e.item_id] += min(5.0, max(1.0, 1 + 4 * q + float(rng.normal(0, 0.8))))
                    self.rating_n[e.item_id] += 1
        self.other_orders = {}
        for item_id, o in self.offers.items():
            counts = today[item_id]
            other = int(rng.poisson(float(np.mean(o.sales_history)) if o.sales_history else 0.0))
            self.other_orders[item_id] = other
            counts["orders"] = counts.get("orders", 0) + other
            counts["sales"] = counts.get("sales", 0.0) + other * o.price
            self.days[item_id].append(counts)
            self.age[item_id] += 1.0


def shown_positions(hits: Sequence[IndexHit], limit: int) -> list[int]:
    """Indices of the hits a response shows: near duplicates folded into the first of their
    ``duplicate_of`` group (``query.searcher._collapse``'s rule), the first ``limit``."""
    seen: set[str] = set()
    out = []
    for i, h in enumerate(hits):
        group = str(h.payload.get("duplicate_of") or h.item_id)
        if group in seen or h.item_id in seen:
            continue
        seen.update((group, h.item_id))
        out.append(i)
        if len(out) == limit:
            break
    return out


def _gain(offer: SimOffer, query: SimQuery) -> float:
    return 1.0 + 3.0 * offer.quality if offer.product_id == query.product_id else 0.0


def oracle_order(hits: Sequence[IndexHit], query: SimQuery, offers: Mapping[str, SimOffer], *,
                 tie_margin: float) -> tuple[list[IndexHit], list[float]]:
    """The best order the re-ranker's rule allows (``rerank.groups.arrange`` with the simulator's
    hidden gain as the model's score): the ceiling of any ranker over these candidates, since the
    best visual product stays first and products trade places only inside a visual near-tie."""
    from rerank.groups import arrange, product_groups

    truth = [_gain(offers[h.item_id], query) for h in hits]
    order = arrange(product_groups(hits), [h.score for h in hits], truth, tie_margin=tie_margin)
    return [hits[i] for i in order], [truth[i] for i in order]


def list_metrics(hits: Sequence[IndexHit], scores: Sequence[float], query: SimQuery,
                 offers: Mapping[str, SimOffer], shown: int) -> dict[str, float | None]:
    idx = shown_positions(hits, shown)
    gains = [_gain(offers[hits[i].item_id], query) for i in idx]
    best: dict[str, float] = {}
    for h in hits:
        g = str(h.payload.get("duplicate_of") or h.item_id)
        best[g] = max(best.get(g, 0.0), _gain(offers[h.item_id], query))
    right = [(s, offers[h.item_id].quality) for h, s in zip(hits, scores, strict=True)
             if offers[h.item_id].product_id == query.product_id]
    return {
        "ndcg@10": ndcg_at_k(gains, 10, ideal=sorted(best.values(), reverse=True)[:shown]),
        "product_first_r1": float(bool(gains) and gains[0] > 0),
        "kendall_tau": kendall_tau([s for s, _ in right], [q for _, q in right]) if len(right) > 1 else None,
    }


@dataclass(frozen=True)
class DayLog:
    rows: pd.DataFrame                  # the impression table (rerank.training's columns + TRUTH, day)
    events: list[SimEvent]
    metrics: dict[str, dict[str, float | None]]  # metric -> {"visual", "ranker", "oracle"}: query means
    ranker: str                         # what served (the re-ranker's name on the day's last query)
    queries: int


def serve_day(
    queries: Sequence[SimQuery],
    search: Search,
    reranker: LightGBMReranker,
    reader: FeatureReader,
    offers: Mapping[str, SimOffer],
    *,
    config: LoopConfig,
    click_model: ClickModel | None = None,
) -> DayLog:
    """One day: search, log the features, serve the re-ranker's order, simulate the shoppers."""
    names = feature_names(STORE_FEATURES)
    ranked: list[tuple[SimQuery, list[str]]] = []
    rows: list[dict[str, Any]] = []
    per: dict[str, dict[str, list]] = {k: {side: [] for side in SIDES}
                                       for k in ("ndcg@10", "product_first_r1", "kendall_tau")}
    ranker_name = reranker.name
    for q in queries:
        hits = list(search(q))
        if not hits:
            continue
        cm = candidate_matrix(hits, category_vote(hits), reader, STORE_FEATURES)  # what is logged
        result = reranker.rerank_with_info(hits)
        ranker_name = result.ranker
        served = result.hits
        scores = result.scores if result.scores is not None else [h.score for h in served]
        for key, value in list_metrics(hits, [h.score for h in hits], q, offers, config.shown).items():
            per[key]["visual"].append(value)
        for key, value in list_metrics(served, scores, q, offers, config.shown).items():
            per[key]["ranker"].append(value)
        for key, value in list_metrics(*oracle_order(hits, q, offers, tie_margin=config.tie_margin), q, offers,
                                       config.shown).items():
            per[key]["oracle"].append(value)
        row_of = {h.item_id: i for i, h in enumerate(hits)}
        shown = [served[i].item_id for i in shown_positions(served, config.shown)]
        ranked.append((q, shown))
        for pos, item_id in enumerate(shown):
            i = row_of[item_id]
            rows.append({"request_id": q.request_id, "request_time": q.time, "item_id": item_id,
                         "position": pos, "group": cm.groups[i], "label": 0,
                         TRUTH: _gain(offers[item_id], q), "day": q.day,
                         **dict(zip(names, cm.X[i].tolist(), strict=True))})
    events = list(simulate_events(ranked, offers, model=click_model, seed=config.seed))
    label: dict[tuple[str, str], int] = {}
    for e in events:
        key = (e.request_id, e.item_id)
        label[key] = max(label.get(key, 0), LABELS[e.kind])
    for r in rows:
        r["label"] = label.get((r["request_id"], r["item_id"]), 0)
    metrics = {k: {side: mean(v) for side, v in sides.items()} for k, sides in per.items()}
    return DayLog(pd.DataFrame(rows), events, metrics, ranker_name, len(ranked))


class FeatureBackend(Protocol):
    """Where the loop's item features come from: ``start`` once before day 0 (the catalog and its
    history), ``end_of_day`` after each day's events, ``reader`` for every read (the logged features
    and the re-ranker's). ``describe`` goes into the report (``feature_store``)."""

    reader: FeatureReader

    def start(self) -> None: ...

    def end_of_day(self, day: int, log: DayLog) -> None: ...

    def describe(self) -> dict[str, Any]: ...


class MemoryFeatures:
    """The simulator's own daily ``FeatureAggregator``, its rows written with ``write`` (default: into
    an ``InMemoryFeatureReader``) and read through ``reader``."""

    def __init__(self, offers: Sequence[SimOffer], config: LoopConfig, *, reader: FeatureReader | None = None,
                 write: FeatureWriter | None = None):
        if (reader is None) != (write is None):
            raise ValueError("pass both reader and write, or neither")
        if reader is None:
            store = InMemoryFeatureReader()
            reader = store

            def write(rows: Mapping[str, Mapping[str, float | None]]) -> None:
                for item_id, values in rows.items():
                    store.put(item_id, values)

        self.reader = reader
        self.write: FeatureWriter = write  # type: ignore[assignment]
        self.aggregator = FeatureAggregator(offers, config)

    def start(self) -> None:
        self.write(self.aggregator.rows())

    def end_of_day(self, day: int, log: DayLog) -> None:
        self.aggregator.end_of_day(day, log.events)
        self.write(self.aggregator.rows())

    def describe(self) -> dict[str, Any]:
        return {"backend": "memory", "online_store": None,
                "note": "the simulator's daily aggregator (offline.simulate.loop.FeatureAggregator), not Feast"}


def run_loop(
    products: Sequence[SimProduct],
    offers: Sequence[SimOffer],
    search: Search,
    registry_dir: str | Path,
    *,
    config: LoopConfig | None = None,
    reader: FeatureReader | None = None,
    write: FeatureWriter | None = None,
    features: FeatureBackend | None = None,
    click_model: ClickModel | None = None,
    out_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Run the loop (module doc) and return its report; with ``out_dir``, also write
    ``report.json`` and ``ndcg_per_day.png`` there. ``features``: where the item features come from
    (``MemoryFeatures``, ``offline.simulate.feast_store.FeastFeatures``); without it, ``reader``/
    ``write`` (default: one ``InMemoryFeatureReader``, written with ``put``) around the simulator's
    own aggregator."""
    config = config or LoopConfig()
    if features is not None and (reader is not None or write is not None):
        raise ValueError("pass features, or reader and write, not both")
    if features is None:
        features = MemoryFeatures(offers, config, reader=reader, write=write)
    reader = features.reader
    started = time.perf_counter()
    by_id = {o.item_id: o for o in offers}
    features.start()
    registry = ModelRegistry(registry_dir)
    reranker = LightGBMReranker(reader, store_features=STORE_FEATURES, registry=registry,
                                tie_margin=config.tie_margin)
    logged: list[pd.DataFrame] = []
    days: list[dict[str, Any]] = []
    for day in range(config.days):
        queries = daily_queries(products, day, config.queries_per_day, seed=config.seed)
        log = serve_day(queries, search, reranker, reader, by_id, config=config, click_model=click_model)
        rows, events, per, ranker_name = log.rows, log.events, log.metrics, log.ranker
        features.end_of_day(day, log)
        logged.append(rows)
        table = pd.concat(logged, ignore_index=True)
        trained = train(table, STORE_FEATURES, holdout_fraction=config.holdout_fraction,
                        num_rounds=config.num_rounds, truth_column=TRUTH, tie_margin=config.tie_margin,
                        use_position=config.use_position, params={"seed": config.seed})
        manifest = trained.publish(registry)
        reranker.activate(manifest.version)
        kinds = [e.kind for e in events]
        days.append({
            "day": day, "ranker": ranker_name, "queries": log.queries,
            "impressions": kinds.count(IMPRESSION), "clicks": kinds.count(CLICK),
            "carts": kinds.count(CART), "orders": kinds.count(ORDER),
            **per,
            "trained": {"version": manifest.version, "holdout": trained.metrics["holdout"]},
        })
    served_days = [d for d in days if d["day"] >= 1] or days
    report: dict[str, Any] = {
        "simulated": True,
        "note": "SIMULATED marketplace and shoppers (offline.simulate): not a measurement of real shoppers",
        "config": asdict(config),
        "catalog": {"products": len(products), "offers": len(offers)},
        **{k: {side: mean([d[k][side] for d in served_days]) for side in SIDES}
           for k in ("ndcg@10", "product_first_r1", "kendall_tau")},
        "final_holdout": days[-1]["trained"]["holdout"] if days else None,
        "feature_store": features.describe(),
        "series": {k: {side: [d[k][side] for d in days] for side in SIDES}
                   for k in ("ndcg@10", "product_first_r1", "kendall_tau")},
        "days": days,
        "runtime_s": round(time.perf_counter() - started, 2),
    }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        report["plot"] = str(plot_ndcg(report, out / "ndcg_per_day.png"))
        (out / "report.json").write_text(json.dumps(report, indent=2, default=_json_default), encoding="utf-8")
    return report


def plot_ndcg(report: Mapping[str, Any], path: str | Path) -> Path:
    """NDCG@10 per day, visual vs ranker (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    days = [d["day"] for d in report["days"]]
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=120)
    for side, style in (("visual", "o--"), ("ranker", "s-"), ("oracle", ":")):
        ax.plot(days, [d["ndcg@10"][side] for d in report["days"]], style,
                label="oracle (the rule's ceiling)" if side == "oracle" else side)
    ax.set_xlabel("simulated day (day 0: no model yet, visual order served)")
    ax.set_ylabel("NDCG@10 (hidden quality)")
    fs = report.get("feature_store") or {}
    where = fs.get("backend", "memory") + (f"/{fs['online_store']}" if fs.get("online_store") else "")
    ax.set_title(f"SIMULATED closed loop: NDCG@10 per day (features: {where})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def _json_default(v: object) -> object:
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, float) and math.isnan(v):
        return None
    raise TypeError(f"{type(v).__name__} is not JSON serialisable")


__all__ = ["STORE_FEATURES", "TRUTH", "DayLog", "FeatureAggregator", "FeatureBackend", "LoopConfig", "MemoryFeatures", "SIDES", "oracle_order", "plot_ndcg", "run_loop", "serve_day", "shown_positions"]
