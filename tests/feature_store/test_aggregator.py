"""The aggregator: redelivery counts once, late and out-of-order events land in their windows, bad
inputs are refused with their reasons while the batch goes on, the marketplace's absolute counters
become windowed counts, rates are smoothed toward the category prior, windows slide on refresh."""

from __future__ import annotations

import math
import random

import pandas as pd
import pytest

from events.models import ItemFeaturesUpdated, ItemUpserted
from feature_store.aggregator import ItemFeatureAggregator
from feature_store.inputs import ItemProfileUpdated, dumps
from feature_store.settings import AggregatorSettings
from tests.feature_store.conftest import Clock
from tests.feature_store.test_historical import engaged, impression

DAY = 86400.0


def counts(store, item: str, *features: str) -> tuple:
    row = store.online([item]).get(item)
    return tuple(None if row is None else row[f] for f in features)


def snapshot(item: str, t: float, **counters) -> dict:
    return {"type": "item_features_updated", "item_id": item, "event_time": t, "counters": counters}


def test_a_redelivered_event_counts_once(make_store):
    clock = Clock()
    store = make_store(clock)
    agg = ItemFeatureAggregator(store)
    t = clock.now - 600
    click = engaged("click-1", "click", "a", t)
    shown = impression("imp-1", t - 5, "a", "b")
    counters = snapshot("a", t - 1, impressions=10, clicks=2)
    report = agg.ingest([shown, click, click, dumps(ItemFeaturesUpdated.model_validate(counters)), counters])
    assert (report.accepted, report.duplicates, report.rejections) == (3, 2, [])
    assert agg.ingest([click, shown, counters]).duplicates == 3
    agg.close()
    again = ItemFeatureAggregator(store)  # a restarted consumer: the ids are on disk
    assert again.ingest([click, shown]).duplicates == 2
    assert counts(store, "a", "impressions_1d", "clicks_1d") == (1, 1)  # the first snapshot is the baseline
    assert counts(store, "b", "impressions_1d") == (1,)
    again.close()


def test_late_and_out_of_order_events_land_in_their_windows(make_store):
    clock = Clock()
    in_order, shuffled = make_store(clock), make_store(clock)
    t = clock.now - 60
    events = [impression(f"i{k}", t - k * 3600, "a") for k in range(6)]
    events += [engaged("c-now", "click", "a", t), engaged("c-2d", "click", "a", t - 2 * DAY),
               engaged("c-20d", "add_to_cart", "a", t - 20 * DAY),
               engaged("o-29d", "order", "a", t - 29.9 * DAY, amount=3.0)]
    a, b = ItemFeatureAggregator(in_order), ItemFeatureAggregator(shuffled)
    assert a.ingest(sorted(events, key=lambda e: e["event_time"])).accepted == len(events)
    mixed = events[:]
    random.Random(3).shuffle(mixed)
    for e in mixed:  # one at a time, in a random order: most of them late
        assert b.ingest([e]).accepted == 1
    features = ("impressions_1d", "clicks_1d", "clicks_7d", "add_to_carts_7d", "add_to_carts_30d", "orders_30d",
                "sales_30d")
    assert counts(in_order, "a", *features) == counts(shuffled, "a", *features) == (6, 1, 2, 0, 1, 1, 3.0)
    # and the history is the same: every row after a late event was recomputed
    rows = pd.DataFrame({"item_id": ["a"] * 4, "event_timestamp": [t - 19 * DAY, t - DAY, t - 1800, t + 1]})
    want = ["clicks_7d", "add_to_carts_30d", "orders_30d", "impressions_1d"]
    h1 = in_order.historical(rows, features=want, as_served=False)
    h2 = shuffled.historical(rows, features=want, as_served=False)
    pd.testing.assert_frame_equal(h1, h2)
    assert h1[want].to_numpy().tolist() == [[0, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 5], [2, 1, 1, 6]]
    a.close()
    b.close()


def test_bad_inputs_are_refused_with_their_reasons_and_the_rest_goes_on(make_sqlite_store):
    clock = Clock()
    store = make_sqlite_store(clock)
    agg = ItemFeatureAggregator(store, AggregatorSettings(max_future_s=60))
    t = clock.now - 10
    batch = [
        {"kind": "hover", "event_id": "e0", "request_id": "r", "item_id": "a", "event_time": t},
        snapshot("a", t, clicks=-3),
        b'{"type": "item_features_updated", "item_id": "a", "event_time": NaN, "counters": {}}',
        snapshot("a", t, sales=float("inf")),
        engaged("future", "click", "a", clock.now + 3600),
        engaged("old", "click", "a", clock.now - 31 * DAY),
        b"{not json",
        {"type": "something_else", "item_id": "a", "event_time": t},
        engaged("amount-on-click", "click", "a", t, amount=5.0),
        impression("dup-items", t, "a", "a"),
        engaged("ok", "click", "a", t),  # the one good input
        snapshot("s", t - 100, impressions=10), snapshot("s", t - 50, impressions=5),  # decreasing
        snapshot("s", t - 100, impressions=11),  # another snapshot at the same instant
    ]
    report = agg.ingest(batch)
    reasons = {r.index: r.reason for r in report.rejections}
    assert reasons == {0: "unknown_kind", 1: "negative_count", 2: "not_finite", 3: "not_finite", 4: "in_future",
                       5: "too_old", 6: "malformed_json", 7: "unknown_kind", 8: "invalid_event",
                       9: "invalid_event", 12: "counters_not_monotonic", 13: "conflicting_counters"}
    assert all(r.detail for r in report.rejections)
    assert report.accepted == 2  # "ok" and the first snapshot of "s"
    assert counts(store, "a", "clicks_1d") == (1,)


def test_marketplace_counters_become_windowed_counts(make_sqlite_store):
    clock = Clock()
    store = make_sqlite_store(clock)
    agg = ItemFeatureAggregator(store)
    now = clock.now
    history = [snapshot("m", now - 20 * DAY, impressions=1000, clicks=50, orders=5, sales=100.0),  # baseline
               snapshot("m", now - 5 * DAY, impressions=1300, clicks=60, orders=6, sales=120.0),
               snapshot("m", now - 0.5 * DAY, impressions=1400, clicks=70, orders=8, sales=150.0, rating=4.2)]
    for s in reversed(history):  # newest first: every one but the first arrives "late"
        assert agg.ingest([s]).accepted == 1
    got = store.online(["m"])["m"]
    assert (got["impressions_1d"], got["impressions_7d"], got["impressions_30d"]) == (100, 400, 400)
    assert (got["clicks_1d"], got["orders_7d"], got["sales_30d"]) == (10, 3, 50.0)
    assert got["rating"] == 4.2
    # interactions add to them
    agg.ingest([impression("x", now - 30, "m"), engaged("y", "click", "m", now - 20)])
    assert counts(store, "m", "impressions_1d", "clicks_1d") == (101, 11)


def test_rates_are_smoothed_toward_the_category_prior(make_sqlite_store):
    clock = Clock()
    store = make_sqlite_store(clock)
    settings = AggregatorSettings()
    agg = ItemFeatureAggregator(store, settings)
    now = clock.now
    day = math.floor(now / DAY) * DAY
    catalog = [ItemUpserted(item_id=i, version=1, title=i, category_path=path, images=["x.jpg"], price=price,
                            event_time=day - 3 * DAY)
               for i, path, price in (("p1", ("Fruit", "Apple"), 2.0), ("p2", ("Fruit", "Apple"), 4.0),
                                      ("p3", ("Fruit", "Apple", "Gala"), 9.0), ("q1", ("Dairy",), 1.0))]
    past = day - 2 * DAY + 100  # a complete day before today: in the priors
    events = [*catalog,
              *[impression(f"h{k}", past + k, "p1", "p2", "q1") for k in range(50)],
              *[engaged(f"hc{k}", "click", "p1", past + 60 + k) for k in range(10)],
              *[engaged(f"ho{k}", "order", "p1", past + 80 + k) for k in range(2)],
              *[engaged(f"qc{k}", "click", "q1", past + 90 + k) for k in range(2)]]
    assert agg.ingest(events).accepted == len(events)
    today = [impression(f"t{k}", now - 100 + k, "p3") for k in range(10)] + [engaged("tc", "click", "p3", now - 50)]
    assert agg.ingest(today).accepted == len(today)

    m, m2 = settings.ctr_prior_strength, settings.cvr_prior_strength
    g_ctr = (12 + m * settings.default_ctr) / (150 + m)  # all categories: 150 impressions, 12 clicks
    g_cvr = (2 + m2 * settings.default_cvr) / (12 + m2)
    c_ctr = (10 + m * g_ctr) / (100 + m)  # Fruit/Apple: 100 impressions, 10 clicks, 2 orders
    c_cvr = (2 + m2 * g_cvr) / (10 + m2)
    got = store.online(["p3", "zz"])["p3"]
    assert got["ctr_7d"] == pytest.approx((1 + m * c_ctr) / (10 + m))
    assert got["cvr_30d"] == pytest.approx((0 + m2 * c_cvr) / (1 + m2))
    assert got["price"] == 9.0 and got["price_to_category_median"] == pytest.approx(9.0 / 4.0)
    assert got["item_age_days"] == pytest.approx((now - (day - 3 * DAY)) / DAY)
    # an item of an unseen category is smoothed toward the global prior
    agg.ingest([impression("new", now - 10, "n1")])
    assert store.online(["n1"])["n1"]["ctr_30d"] == pytest.approx((0 + m * g_ctr) / (1 + m))
    # profile facts without an event of their own
    agg.ingest([ItemProfileUpdated(item_id="p3", event_time=now - 5, shop_score=0.8, rating_count=31)])
    got = store.online(["p3"])["p3"]
    assert (got["shop_score"], got["rating_count"], got["price"]) == (0.8, 31.0, 9.0)


def test_refresh_slides_the_windows_and_keeps_live_rows_within_their_ttl(make_sqlite_store):
    clock = Clock()
    store = make_sqlite_store(clock)
    agg = ItemFeatureAggregator(store)
    agg.ingest([impression("i", clock.now - 10, "a"), engaged("c", "click", "a", clock.now - 5)])
    clock.advance(1.5 * DAY)
    assert counts(store, "a", "clicks_1d", "clicks_7d") == (1, 1)  # the last row, before a refresh
    assert agg.refresh() == 1  # behaviour changed; the profile did not
    assert counts(store, "a", "clicks_1d", "clicks_7d", "price") == (0, 1, None)
    clock.advance(1.5 * DAY)  # 3 days after the last event: the first rows would have expired
    agg.refresh()
    assert counts(store, "a", "clicks_7d") == (1,)
    clock.advance(30 * DAY)
    agg.refresh()  # everything out of every window: one all-zero row, then left to expire
    assert counts(store, "a", "clicks_30d") == (0,)
    clock.advance(3 * DAY)
    assert agg.refresh() == 0
    assert counts(store, "a", "clicks_30d") == (None,)


def test_a_failed_push_records_nothing(make_sqlite_store, monkeypatch):
    clock = Clock()
    store = make_sqlite_store(clock)
    agg = ItemFeatureAggregator(store)
    click = engaged("c1", "click", "a", clock.now - 5)
    real = store.push

    def failing(view, rows, to):
        raise OSError("disk full")

    monkeypatch.setattr(store, "push", failing)
    with pytest.raises(OSError):
        agg.ingest([click])
    monkeypatch.setattr(store, "push", real)
    assert agg.ingest([click]).accepted == 1  # not a duplicate: the first try left no trace
    assert counts(store, "a", "clicks_1d") == (1,)


def test_a_row_resolution_coalesces_rows_without_reaching_ahead(make_sqlite_store):
    clock = Clock()
    store = make_sqlite_store(clock)
    agg = ItemFeatureAggregator(store, AggregatorSettings(row_resolution_s=60))
    base = math.floor(clock.now / 60) * 60 - 600  # a minute boundary, 10 minutes ago
    events = [impression(f"i{k}", base + 1 + k, "a") for k in range(10)] + [engaged("c", "click", "a", base + 30)]
    report = agg.ingest(events)
    assert report.rows == 2  # one behaviour and one profile row, at base + 60
    rows = pd.DataFrame({"item_id": ["a", "a"], "event_timestamp": [base + 40, base + 61]})
    got = store.historical(rows, features=["impressions_1d", "clicks_1d"], as_served=False)
    assert math.isnan(got["impressions_1d"].iloc[0])  # inside the bucket: not yet
    assert (got["impressions_1d"].iloc[1], got["clicks_1d"].iloc[1]) == (10, 1)
