"""Backfill: ``python -m feature_store backfill --file F`` loads a history of counters (CSV, Parquet
or JSONL) through the aggregator — history older than the 30-day horizon included — and reports
each refused row with its line and reason."""

from __future__ import annotations

import csv
import json
import time

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from feature_store.__main__ import main
from feature_store.settings import FeatureStoreSettings
from feature_store.store import ItemFeatureStore
from tests.feature_store.conftest import unique_project

DAY = 86400.0
NOW = time.time()
COLUMNS = ("item_id", "event_time", "impressions", "clicks", "orders", "sales", "rating", "category", "price",
           "shop_score", "rating_count")


def history() -> list[dict]:
    """60 days of daily counters of "h" (100 impressions, 5 clicks, 1 order of 10.0 a day), a profile
    on the first day, a price change 10 days ago, then the bad rows."""
    rows = []
    for d in range(60, -1, -1):
        k = 60 - d
        row = {"item_id": "h", "event_time": NOW - d * DAY - 3600, "impressions": 100 * k, "clicks": 5 * k,
               "orders": k, "sales": 10.0 * k, "rating": 4.0 if d > 5 else 4.5}
        if d == 60:
            row.update(category="Fruit/Apple", price=3.0, shop_score=0.9, rating_count=10)
        if d == 10:
            row.update(price=2.5)
        rows.append(row)
    rows[30]["event_time"] = pd.Timestamp(rows[30]["event_time"], unit="s", tz="UTC").isoformat()  # ISO works
    rows += [{"item_id": "bad", "event_time": NOW - DAY, "clicks": -1},
             {"item_id": "bad", "event_time": NOW - DAY, "sales": float("nan")},
             {"item_id": "bad", "event_time": "yesterday", "clicks": 1},
             {"item_id": "bad", "event_time": NOW + DAY, "clicks": 1},
             {"item_id": "h", "event_time": NOW - 3 * DAY - 1800, "impressions": 1}]  # decreasing
    return rows


def write(path, rows: list[dict]) -> None:
    if path.suffix == ".csv":
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            w.writeheader()
            for r in rows:
                w.writerow({k: ("nan" if isinstance(v, float) and v != v else v) for k, v in r.items()})
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))  # NaN as the NaN literal
    else:
        table = pa.Table.from_pylist([{c: r.get(c) for c in COLUMNS} for r in rows],
                                     schema=pa.schema([("item_id", pa.string()), ("event_time", pa.string()),
                                                       *[(c, pa.int64()) for c in ("impressions", "clicks", "orders")],
                                                       ("sales", pa.float64()), ("rating", pa.float64()),
                                                       ("category", pa.string()), ("price", pa.float64()),
                                                       ("shop_score", pa.float64()), ("rating_count", pa.int64())]))
        pq.write_table(table, path)


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_backfill_loads_history_through_the_aggregator(tmp_path, suffix, capsys):
    rows = history()
    if suffix == ".parquet":  # one column, one type: the times as ISO strings
        rows = [{**r, "event_time": r["event_time"] if isinstance(r["event_time"], str)
                 else pd.Timestamp(r["event_time"], unit="s", tz="UTC").isoformat()} for r in rows]
    path = tmp_path / f"history{suffix}"
    write(path, rows)
    project = unique_project("bf")
    data = tmp_path / "features"
    assert main(["--data-dir", str(data), "--project", project, "backfill", "--file", str(path)]) == 0
    out, err = capsys.readouterr()
    summary = json.loads(out)
    assert summary["accepted"] == 61 + 2 and summary["inputs"] == 61 + 2 + 5
    assert summary["rejected"] == {"negative_count": 1, "not_finite": 1, "invalid_event": 1, "in_future": 1,
                                   "counters_not_monotonic": 1}
    first_bad_line = {".csv": 63, ".jsonl": 62, ".parquet": 62}[suffix]
    assert f"history{suffix}:{first_bad_line}:" in err

    store = ItemFeatureStore(FeatureStoreSettings(data_dir=data, project=project))
    got = store.online(["h"])["h"]
    # refreshed to now: the last snapshot was an hour ago
    assert (got["impressions_1d"], got["clicks_7d"], got["orders_30d"], got["sales_30d"]) == (100, 35, 30, 300.0)
    assert (got["price"], got["rating"], got["shop_score"], got["rating_count"]) == (2.5, 4.5, 0.9, 10.0)
    assert got["item_age_days"] == pytest.approx(60 + 1 / 24, abs=0.01)
    # and the history is there for training, older than the horizon too (as served, as it streamed)
    train = pd.DataFrame({"item_id": ["h", "h", "h"],
                          "event_timestamp": [NOW - 45 * DAY, NOW - 20 * DAY, NOW - 9 * DAY]})
    h = store.historical(train, features=["impressions_7d", "clicks_30d", "price", "item_age_days"])
    assert h["impressions_7d"].tolist() == [700, 700, 700]
    assert h["clicks_30d"].tolist() == [75, 150, 150]  # 15 and 30 days after the baseline
    assert h["price"].tolist() == [3.0, 3.0, 2.5]
    assert h["item_age_days"].round(2).tolist() == [15.04, 40.04, 51.04]
    store.close()
