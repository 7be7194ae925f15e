"""The SIMULATOR's parts: offers per product, the simulated visual search, queries and the
position-biased click model (seeded, no network)."""

from __future__ import annotations

from collections import Counter

import numpy as np

from offline.simulate.catalog import products_from_grocery, simulate_offers, synthetic_products
from offline.simulate.search import SimulatedVisualSearch
from offline.simulate.shoppers import (
    CART,
    CLICK,
    DAY_SECONDS,
    EPOCH,
    IMPRESSION,
    ORDER,
    ClickModel,
    daily_queries,
    simulate_events,
)

PRODUCTS = synthetic_products(n_categories=10, per_category=3)


def test_every_product_gets_two_to_five_offers_and_twins_reuse_its_image():
    offers = simulate_offers(PRODUCTS, seed=1)
    per = Counter(o.product_id for o in offers)
    assert set(per) == {p.product_id for p in PRODUCTS} and all(2 <= n <= 5 for n in per.values())
    by_id = {o.item_id: o for o in offers}
    own = {p.product_id: p.images[0] for p in PRODUCTS}
    for o in offers:
        assert o.price > 0 and 0 <= o.quality <= 1 and 0 <= o.price_appeal <= 1
        assert (o.rating is None) == (o.rating_count == 0) and (o.rating is None or 1 <= o.rating <= 5)
        assert len(o.sales_history) == 30
        if o.duplicate_of:
            assert by_id[o.duplicate_of].product_id == o.product_id and o.image == own[o.product_id]
        elif not o.item_id.endswith("#o0"):
            assert o.image != own[o.product_id]  # another photo of the same product
        hidden = {"quality", "price_appeal"}
        assert hidden.isdisjoint(o.payload()) and hidden.isdisjoint(o.observable())
    assert any(o.duplicate_of for o in offers) and any(o.product_group for o in offers)
    assert any(not o.duplicate_of and not o.product_group and not o.item_id.endswith("#o0") for o in offers)
    assert simulate_offers(PRODUCTS, seed=1) == offers and simulate_offers(PRODUCTS, seed=2) != offers


def test_grocery_products_carry_their_train_photos(grocery):
    products = products_from_grocery(grocery)
    assert len(products) == 81 and len({p.category for p in products}) > 40
    assert all(p.images[0].endswith("_Iconic.jpg") for p in products)
    assert sum(len(p.images) > 1 for p in products) >= 70
    offers = simulate_offers(products, seed=0)
    photos = [o for o in offers if "/train/" in o.image]
    assert photos and all(not o.duplicate_of for o in photos)


def test_the_simulated_search_ranks_the_photographed_product_high_and_twins_alike():
    offers = simulate_offers(PRODUCTS, seed=1)
    search = SimulatedVisualSearch(offers, seed=1, candidate_k=40)
    queries = daily_queries(PRODUCTS, 0, 300, seed=1)
    first = 0
    for q in queries:
        hits = search(q)
        assert len(hits) == 40 and [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
        first += hits[0].item_id.startswith(q.product_id + "#")
        score = {h.item_id: h.score for h in hits}
        for h in hits:
            dup = h.payload.get("duplicate_of")
            if dup and dup in score and h.item_id.startswith(q.product_id):
                assert abs(score[dup] - h.score) < 0.02
    assert 0.7 < first / len(queries) < 0.97  # the visual search is good, not perfect
    assert search(queries[0]) == search(queries[0])  # per-query seeded


def test_queries_fall_within_their_day():
    qs = daily_queries(PRODUCTS, 3, 200, seed=0)
    times = [q.time for q in qs]
    assert times == sorted(times) and EPOCH + 3 * DAY_SECONDS <= times[0] and times[-1] < EPOCH + 4 * DAY_SECONDS
    assert len({q.request_id for q in qs}) == 200 and all(q.day == 3 for q in qs)


def test_clicks_fall_with_position_and_follow_the_funnel():
    offers = simulate_offers(PRODUCTS, seed=1)
    by_id = {o.item_id: o for o in offers}
    queries = daily_queries(PRODUCTS, 0, 4000, seed=5)
    # the photographed product's first offer, shown at a random position among other products
    rng = np.random.default_rng(0)
    ranked, where = [], {}
    others = [o.item_id for o in offers]
    for q in queries:
        target = f"{q.product_id}#o0"
        fill = [i for i in rng.choice(others, 12, replace=False) if not i.startswith(q.product_id)][:9]
        pos = int(rng.integers(0, 10))
        shown = fill[:pos] + [target] + fill[pos:]
        ranked.append((q, shown))
        where[q.request_id] = pos
    events = list(simulate_events(ranked, by_id, seed=0))
    clicks = np.zeros(10)
    seen = np.zeros(10)
    for q, _ in ranked:
        seen[where[q.request_id]] += 1
    for e in events:
        if e.kind == CLICK and e.position == where[e.request_id]:
            clicks[e.position] += 1
    ctr = clicks / seen
    assert ctr[0] > 2 * ctr[4] > 0 and ctr[0] > ctr[1] > ctr[3]
    model = ClickModel()
    assert model.p_examine(0) == 1 and model.p_examine(3) == 0.25
    by_key: dict[tuple[str, str], list] = {}
    for e in events:
        by_key.setdefault((e.request_id, e.item_id), []).append(e)
    kinds = [IMPRESSION, CLICK, CART, ORDER]
    for evs in by_key.values():
        assert [e.kind for e in evs] == kinds[: len(evs)]
        assert all(a.time < b.time for a, b in zip(evs, evs[1:], strict=False))
    assert sum(e.kind == ORDER for e in events) > 0
    assert list(simulate_events(ranked[:50], by_id, seed=0)) == [
        e for e in events if e.request_id in {q.request_id for q, _ in ranked[:50]}]
