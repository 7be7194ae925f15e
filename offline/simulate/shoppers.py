"""SIMULATED shoppers: who searches when, and what they do with the list they are shown.

Queries: ``daily_queries`` draws ``n`` searches a day, each for one product (fixed, seeded
popularity weights), at uniform times of the day, each with one of the product's photos (its
``query_photos`` where it has them: another split than the offers' images).

The click model (``ClickModel``) is position based: a shopper examines position ``p`` (0-based)
with probability ``(1 / (p + 1)) ** eta`` and, having examined an offer, clicks it with
``relevance × (click_base + click_quality × attract)``, where relevance is 1 for an offer of the
photographed product and small for any other (``relevance_same_category``, ``relevance_other``) and
``attract = 0.7 quality + 0.3 price_appeal`` (both hidden). A click leads to add-to-cart with
``relevance × (cart_base + cart_quality × (0.6 quality + 0.4 price_appeal))`` and a cart to an order
with ``order_base + order_quality × quality``. Each shopper examines the whole list independently
(no cascade), so the logged clicks carry exactly the position bias ``eta`` puts in.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from offline.simulate.catalog import SimOffer, SimProduct

DAY_SECONDS = 86_400
# The simulated days start on 2026-01-05 00:00 UTC (a Monday); only differences matter.
EPOCH = 1_767_571_200.0

IMPRESSION, CLICK, CART, ORDER = "impression", "click", "add_to_cart", "order"
LABELS = {IMPRESSION: 0, CLICK: 1, CART: 2, ORDER: 3}


@dataclass(frozen=True)
class SimQuery:
    request_id: str
    product_id: str       # the product in the shopper's photo (the simulator's truth)
    day: int
    time: float           # epoch seconds
    photo: str | None     # one of the product's photos, for a search that looks at images


@dataclass(frozen=True)
class SimEvent:
    kind: str             # impression, click, add_to_cart, order
    request_id: str
    item_id: str
    position: int
    time: float


@dataclass(frozen=True)
class ClickModel:
    eta: float = 1.0
    relevance_same_category: float = 0.12
    relevance_other: float = 0.03
    click_base: float = 0.10
    click_quality: float = 0.60
    cart_base: float = 0.10
    cart_quality: float = 0.60
    order_base: float = 0.30
    order_quality: float = 0.60

    def p_examine(self, position: int) -> float:
        return (1.0 / (position + 1)) ** self.eta

    def relevance(self, offer: SimOffer, query: SimQuery, query_category: str) -> float:
        if offer.product_id == query.product_id:
            return 1.0
        return self.relevance_same_category if offer.category == query_category else self.relevance_other

    def p_click(self, offer: SimOffer, relevance: float) -> float:
        return relevance * (self.click_base + self.click_quality * (0.7 * offer.quality + 0.3 * offer.price_appeal))

    def p_cart(self, offer: SimOffer, relevance: float) -> float:
        return relevance * (self.cart_base + self.cart_quality * (0.6 * offer.quality + 0.4 * offer.price_appeal))

    def p_order(self, offer: SimOffer) -> float:
        return self.order_base + self.order_quality * offer.quality


def query_rng(seed: int, request_id: str, salt: int = 0) -> np.random.Generator:
    """A generator that depends on the seed and the request only (not on what ran before)."""
    return np.random.default_rng([seed, salt, zlib.crc32(request_id.encode())])


def daily_queries(products: Sequence[SimProduct], day: int, n: int, *, seed: int = 0) -> list[SimQuery]:
    """``n`` searches on ``day``, in time order."""
    weights = np.random.default_rng([seed, 7]).lognormal(0.0, 0.8, len(products))
    weights /= weights.sum()
    rng = np.random.default_rng([seed, 11, day])
    picks = rng.choice(len(products), size=n, p=weights)
    times = np.sort(rng.uniform(0, DAY_SECONDS, n))
    out = []
    for i, (k, t) in enumerate(zip(picks, times, strict=True)):
        prod = products[int(k)]
        photos = prod.query_photos or prod.images[1:] or prod.images
        out.append(SimQuery(f"d{day:03d}-q{i:05d}", prod.product_id, day, EPOCH + day * DAY_SECONDS + float(t),
                            photos[int(rng.integers(len(photos)))]))
    return out


def simulate_events(
    ranked: Iterable[tuple[SimQuery, Sequence[str]]],
    offers: Mapping[str, SimOffer],
    *,
    model: ClickModel | None = None,
    seed: int = 0,
) -> Iterator[SimEvent]:
    """Impressions (every shown offer) and clicks / add-to-carts / orders, with event times, for
    each query and the item ids it was shown, best first (from whatever search and ranker)."""
    model = model or ClickModel()
    products = {o.product_id: o.category for o in offers.values()}
    for query, shown in ranked:
        rng = query_rng(seed, query.request_id, salt=1)
        category = products.get(query.product_id, "")
        for pos, item_id in enumerate(shown):
            offer = offers[item_id]
            yield SimEvent(IMPRESSION, query.request_id, item_id, pos, query.time)
            rel = model.relevance(offer, query, category)
            if rng.random() >= model.p_examine(pos) or rng.random() >= model.p_click(offer, rel):
                continue
            t = query.time + float(rng.uniform(2, 30))
            yield SimEvent(CLICK, query.request_id, item_id, pos, t)
            if rng.random() >= model.p_cart(offer, rel):
                continue
            t += float(rng.uniform(10, 120))
            yield SimEvent(CART, query.request_id, item_id, pos, t)
            if rng.random() >= model.p_order(offer):
                continue
            yield SimEvent(ORDER, query.request_id, item_id, pos, t + float(rng.uniform(60, 3600)))
