"""Backfill: a file of historical counters → the aggregator, through the same path as the stream.

The file is CSV, Parquet or JSONL (by extension). A row has ``item_id`` and ``event_time`` (unix
seconds or ISO 8601, naive = UTC) and any of:

- the marketplace's absolute counters ``impressions, clicks, orders, sales, rating`` → an
  ``ItemFeaturesUpdated`` (a counter left empty is 0, as in the event);
- profile facts ``category, price, shop, shop_score, rating_count`` → an ``ItemProfileUpdated``.

A JSONL line that has a ``type`` or ``kind`` is taken as an event itself (an interaction, a catalog
event). Inputs are sorted by event time and ingested in ``replay`` mode, in chunks spanning less
than the lateness horizon, so history older than 30 days loads (the horizon follows the replay);
rows come out with ``created_at`` at their own time, as if they had streamed. At the end
``refresh`` brings each item's rows up to now. A refused row is reported with its line number
(header = line 1 in CSV; first line = 1 in JSONL; row 1 = the first in Parquet).
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from events.contract import JsonError, loads
from feature_store.aggregator import ItemFeatureAggregator
from feature_store.inputs import INVALID_EVENT, MALFORMED_JSON, FeatureInput, Rejection, parse_input

COUNTER_COLUMNS = ("impressions", "clicks", "orders", "sales", "rating")
PROFILE_COLUMNS = ("category", "price", "shop", "shop_score", "rating_count")
CHUNK = 5000


@dataclass
class BackfillReport:
    inputs: int = 0
    accepted: int = 0
    duplicates: int = 0
    rejections: list[tuple[int, Rejection]] = field(default_factory=list)  # (line, why)
    rows: int = 0
    refreshed: int = 0

    def summary(self) -> dict:
        reasons: dict[str, int] = {}
        for _, r in self.rejections:
            reasons[r.reason] = reasons.get(r.reason, 0) + 1
        return {"inputs": self.inputs, "accepted": self.accepted, "duplicates": self.duplicates,
                "rejected": reasons, "rows_pushed": self.rows, "rows_refreshed": self.refreshed}


def _scalar(v: object) -> object:
    """A CSV cell as JSON would carry it: '' → absent, numbers as numbers (NaN kept, to be refused)."""
    if not isinstance(v, str):
        return v
    s = v.strip()
    if s == "":
        return None
    try:
        return int(s)
    except ValueError:
        pass
    try:
        return float(s)
    except ValueError:
        return s


def _time(v: object) -> object:
    if isinstance(v, str):
        try:
            dt = datetime.fromisoformat(v.strip().replace("Z", "+00:00"))
        except ValueError:
            return v
        return (dt if dt.tzinfo else dt.replace(tzinfo=UTC)).timestamp()
    if isinstance(v, datetime):
        return (v if v.tzinfo else v.replace(tzinfo=UTC)).timestamp()
    return v


def row_inputs(row: dict) -> list[dict]:
    """One history row → the input dicts it stands for (an event itself, or counters and/or profile)."""
    if row.get("type") or row.get("kind"):
        return [row]
    row = {k: _scalar(v) for k, v in row.items()}
    base = {"item_id": row.get("item_id"), "event_time": _time(row.get("event_time"))}
    out = []
    counters = {c: row[c] for c in COUNTER_COLUMNS if row.get(c) is not None}
    if counters:
        out.append({"type": "item_features_updated", **base, "counters": counters})
    profile = {c: row[c] for c in PROFILE_COLUMNS if row.get(c) is not None}
    if profile:
        if "shop" in profile:
            profile["shop"] = str(profile["shop"])
        if "category" in profile:
            profile["category"] = str(profile["category"])
        out.append({"type": "item_profile_updated", **base, **profile})
    if not out:
        out.append({"type": "item_features_updated", **base, "counters": {}})
    return out


def read_rows(path: Path) -> Iterator[tuple[int, dict | Rejection]]:
    """(line number, row or why it is unreadable) for each row of a CSV, Parquet or JSONL file."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            for n, row in enumerate(csv.DictReader(f), start=2):
                yield n, row
    elif suffix in (".parquet", ".pq"):
        import pyarrow.parquet as pq

        for n, row in enumerate(pq.read_table(path).to_pylist(), start=1):
            yield n, row
    elif suffix in (".jsonl", ".ndjson", ".json"):
        with path.open(encoding="utf-8") as f:
            for n, text in enumerate(f, start=1):
                if not text.strip():
                    continue
                try:
                    obj = loads(text)
                except JsonError as e:
                    yield n, Rejection(MALFORMED_JSON, str(e))
                    continue
                yield n, obj if isinstance(obj, dict) else Rejection(INVALID_EVENT, "a line is not a JSON object")
    else:
        raise ValueError(f"{path}: expected .csv, .parquet or .jsonl")


def backfill(aggregator: ItemFeatureAggregator, path: str | Path, *, refresh: bool = True) -> BackfillReport:
    """Load a history file through ``aggregator.ingest(..., replay=True)``."""
    report = BackfillReport()
    inputs: list[tuple[int, FeatureInput]] = []
    for line, row in read_rows(Path(path)):
        if isinstance(row, Rejection):
            report.inputs += 1
            report.rejections.append((line, row))
            continue
        for raw in row_inputs(row):
            report.inputs += 1
            parsed = parse_input(raw)
            if isinstance(parsed, Rejection):
                report.rejections.append((line, parsed))
            else:
                inputs.append((line, parsed))
    inputs.sort(key=lambda x: x[1].event_time)
    span = aggregator.settings.max_lateness_s / 2
    start = 0
    while start < len(inputs):
        end = start + 1
        t0 = inputs[start][1].event_time
        while end < len(inputs) and end - start < CHUNK and inputs[end][1].event_time - t0 < span:
            end += 1
        chunk = inputs[start:end]
        got = aggregator.ingest([e for _, e in chunk], replay=True)
        report.accepted += got.accepted
        report.duplicates += got.duplicates
        report.rows += got.rows
        report.rejections.extend((chunk[r.index][0], r) for r in got.rejections if r.index is not None)
        start = end
    if refresh:
        report.refreshed = aggregator.refresh()
    report.rejections.sort(key=lambda x: x[0])
    return report


__all__ = ["BackfillReport", "backfill", "read_rows", "row_inputs"]
