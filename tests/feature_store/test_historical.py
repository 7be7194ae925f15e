"""Training rows through ``get_historical_features``: point in time (a value written after an
impression never reaches that impression's row), corrections hidden from rows served before they
arrived, TTLs, and every entity row back in its order (the file store's row drops worked around).

The online store plays no part in these, so they run on SQLite only."""

from __future__ import annotations

import math

import pandas as pd

from feature_store.aggregator import ItemFeatureAggregator
from tests.feature_store.conftest import Clock


def impression(event_id: str, t: float, *items: str) -> dict:
    return {"kind": "impression", "event_id": event_id, "request_id": f"req-{event_id}", "query_id": "q",
            "item_ids": list(items), "positions": list(range(len(items))), "scores": [0.5] * len(items),
            "model_version": "m1", "ranker_version": "visual", "event_time": t}


def engaged(event_id: str, kind: str, item: str, t: float, **extra) -> dict:
    return {"kind": kind, "event_id": event_id, "request_id": "req", "item_id": item, "event_time": t, **extra}


def stream(clock: Clock, aggregator: ItemFeatureAggregator, *events: dict, lag: float = 0.05):
    """Each event arrives ``lag`` seconds after it happened (the clock follows it)."""
    for e in events:
        clock.now = e["event_time"] + lag
        report = aggregator.ingest([e])
        assert report.accepted == 1, report


def test_a_value_written_after_an_impression_never_reaches_its_training_row(make_sqlite_store):
    clock = Clock()
    store = make_sqlite_store(clock)
    agg = ItemFeatureAggregator(store)
    t0 = clock.now - 3600
    stream(clock, agg,
           impression("i1", t0, "a", "b"),
           engaged("c1", "click", "a", t0 + 10),
           impression("i2", t0 + 20, "a"),  # the training row we look at
           engaged("c2", "click", "a", t0 + 30),  # after it: must not reach it
           engaged("o1", "order", "a", t0 + 40, amount=12.5))
    rows = pd.DataFrame({"item_id": ["a", "a", "b"], "event_timestamp": [t0, t0 + 20, t0 + 20],
                         "label": [1, 0, 0]})
    for as_served in (False, True):
        got = store.historical(rows, features=["impressions_1d", "clicks_1d", "orders_1d", "sales_1d"],
                               as_served=as_served)
        assert list(got["label"]) == [1, 0, 0]
        first, second, other = got.to_dict("records")
        # at i1's own instant nothing was counted yet: its own impression is not its feature
        assert math.isnan(first["impressions_1d"])
        # at i2: i1 and c1 only — not i2 itself, not c2, not the order
        assert (second["impressions_1d"], second["clicks_1d"], second["orders_1d"], second["sales_1d"]) == (1, 1, 0, 0)
        assert (other["impressions_1d"], other["clicks_1d"]) == (1, 0)
    # while the online store, asked now, has everything
    now = store.online(["a"])["a"]
    assert (now["impressions_1d"], now["clicks_1d"], now["orders_1d"], now["sales_1d"]) == (2, 2, 1, 12.5)


def test_a_late_correction_reaches_training_only_when_asked_for_best_knowledge(make_sqlite_store):
    clock = Clock()
    store = make_sqlite_store(clock)
    agg = ItemFeatureAggregator(store)
    t0 = clock.now - 7200
    stream(clock, agg, impression("i1", t0, "a"), impression("i2", t0 + 100, "a"))
    # a click that happened at t0 + 50 arrives an hour later, after i2 was served
    clock.now = t0 + 3700
    assert agg.ingest([engaged("late", "click", "a", t0 + 50)]).accepted == 1
    row = pd.DataFrame({"item_id": ["a"], "event_timestamp": [t0 + 200]})
    served = store.historical(row, features=["clicks_1d"], as_served=True)["clicks_1d"].iloc[0]
    known = store.historical(row, features=["clicks_1d"], as_served=False)["clicks_1d"].iloc[0]
    assert (served, known) == (0, 1)


def test_ttl_and_every_entity_row_kept_in_order(make_sqlite_store):
    clock = Clock()
    store = make_sqlite_store(clock)
    t = clock.now - 10 * 86400
    store.push("item_behaviour", [{"item_id": "a", "event_timestamp": t, "created_at": t,
                                   **{f: 1 for f in ("impressions_1d", "impressions_7d", "impressions_30d")},
                                   **{f: 0 for f in ("clicks_1d", "clicks_7d", "clicks_30d", "add_to_carts_1d",
                                                     "add_to_carts_7d", "add_to_carts_30d", "orders_1d",
                                                     "orders_7d", "orders_30d")},
                                   **{f: 0.0 for f in ("sales_1d", "sales_7d", "sales_30d", "ctr_7d", "ctr_30d",
                                                       "cvr_7d", "cvr_30d")}}])
    rows = pd.DataFrame({"item_id": ["a", "zz", "a", "a", "a"],
                         "event_timestamp": [t + 3600, t + 3600, t + 3 * 86400, t - 60, t + 3600],
                         "request": [5, 4, 3, 2, 1]})
    got = store.historical(rows, features=["impressions_1d"])
    assert list(got["request"]) == [5, 4, 3, 2, 1]  # all back, in order, duplicates included
    values = list(got["impressions_1d"])
    assert values[0] == 1 and values[4] == 1  # within the 2-day TTL
    assert math.isnan(values[1])  # an item the store never saw
    assert math.isnan(values[2])  # 3 days later: past the behaviour TTL
    assert math.isnan(values[3])  # before the row existed
