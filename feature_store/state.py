"""The aggregator's state, one SQLite file in the data dir (``aggregator.db``): what it has seen and
what it needs to recompute a feature row as of any accepted time.

Tables:

- ``seen``: idempotency keys (event ids) of applied inputs, kept as long as an input of that age
  is still accepted; a redelivery after that is refused as ``too_old``, so it never counts twice.
- ``interactions``: one row per (interaction, item) with its increments, at the event's time — the
  finest "bucket": a window is summed exactly over ``(t - W, t]`` however late an event arrived.
- ``snapshots``: the marketplace's absolute counters per (item, event time). A windowed count is
  the difference of two snapshots (see ``feature_store.aggregator``).
- ``profile``: profile facts per (item, event time); ``items``: each item's first-seen time and its
  current category and price (for the category median).
- ``category_daily``: per (category, UTC day) increments, from which the category priors come.
- ``rows``: every feature row pushed (item, view, timestamp, version, created, values) within the
  acceptance horizon, plus each item's newest: what a late event must recompute (``version``
  counts its re-pushes), what ``refresh`` compares against.

Retention: increments and snapshots for the acceptance horizon plus the longest window (a 30-day
window as of a 30-day-late event reaches 60 days back); of older snapshots the newest per item is
kept as the baseline.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS seen (event_id TEXT PRIMARY KEY, event_time REAL NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS seen_time ON seen(event_time);
CREATE TABLE IF NOT EXISTS interactions (item_id TEXT NOT NULL, event_time REAL NOT NULL,
    impressions INTEGER NOT NULL, clicks INTEGER NOT NULL, add_to_carts INTEGER NOT NULL,
    orders INTEGER NOT NULL, sales REAL NOT NULL);
CREATE INDEX IF NOT EXISTS interactions_item_time ON interactions(item_id, event_time);
CREATE TABLE IF NOT EXISTS snapshots (item_id TEXT NOT NULL, event_time REAL NOT NULL,
    impressions INTEGER NOT NULL, clicks INTEGER NOT NULL, orders INTEGER NOT NULL, sales REAL NOT NULL,
    rating REAL, PRIMARY KEY (item_id, event_time)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS profile (item_id TEXT NOT NULL, event_time REAL NOT NULL, category TEXT,
    price REAL, shop TEXT, shop_score REAL, rating_count INTEGER);
CREATE INDEX IF NOT EXISTS profile_item_time ON profile(item_id, event_time);
CREATE TABLE IF NOT EXISTS items (item_id TEXT PRIMARY KEY, first_seen REAL NOT NULL, category TEXT,
    category_time REAL, price REAL, price_time REAL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS items_category ON items(category);
CREATE TABLE IF NOT EXISTS category_daily (category TEXT NOT NULL, day INTEGER NOT NULL,
    impressions REAL NOT NULL, clicks REAL NOT NULL, orders REAL NOT NULL,
    PRIMARY KEY (category, day)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS rows (item_id TEXT NOT NULL, view TEXT NOT NULL, ts REAL NOT NULL,
    version INTEGER NOT NULL, created REAL NOT NULL, vals TEXT NOT NULL,
    PRIMARY KEY (item_id, view, ts)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value REAL NOT NULL) WITHOUT ROWID;
"""

SNAPSHOT_COUNTERS = ("impressions", "clicks", "orders", "sales")
Snapshot = tuple[float, int, int, int, float, float | None]  # event_time, counters..., rating
DAY = 86400.0


def day_of(t: float) -> int:
    return int(t // DAY)


class AggregatorState:
    """The SQLite state; every method runs inside ``transaction()``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")  # the seen ids are the redelivery guard: durable
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Everything in it commits together or not at all (the feature pushes run inside it, so
        a failed push leaves no event marked as seen)."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # -- idempotency ---------------------------------------------------------------------------

    def mark_seen(self, event_id: str, event_time: float) -> bool:
        """Record ``event_id``; False when it was already there (a redelivery)."""
        cur = self.db.execute("INSERT OR IGNORE INTO seen VALUES (?, ?)", (event_id, event_time))
        return cur.rowcount == 1

    # -- items, categories ---------------------------------------------------------------------

    def item(self, item_id: str) -> tuple[float, str | None, float | None] | None:
        """(first_seen, current category, current price) or None."""
        return self.db.execute("SELECT first_seen, category, price FROM items WHERE item_id = ?",
                               (item_id,)).fetchone()

    def see_item(self, item_id: str, t: float) -> bool:
        """Note the item existed at ``t``; True when that moved its first-seen time (or is its first)."""
        row = self.db.execute("SELECT first_seen FROM items WHERE item_id = ?", (item_id,)).fetchone()
        if row is None:
            self.db.execute("INSERT INTO items (item_id, first_seen) VALUES (?, ?)", (item_id, t))
            return True
        if t < row[0]:
            self.db.execute("UPDATE items SET first_seen = ? WHERE item_id = ?", (t, item_id))
            return True
        return False

    def category_now(self, item_id: str) -> str:
        row = self.db.execute("SELECT category FROM items WHERE item_id = ?", (item_id,)).fetchone()
        return (row[0] if row else None) or ""

    def add_category_day(self, category: str, t: float, impressions: float, clicks: float, orders: float) -> None:
        if not (impressions or clicks or orders):
            return
        self.db.execute(
            "INSERT INTO category_daily VALUES (?, ?, ?, ?, ?) ON CONFLICT(category, day) DO UPDATE SET "
            "impressions = impressions + excluded.impressions, clicks = clicks + excluded.clicks, "
            "orders = orders + excluded.orders", (category, day_of(t), impressions, clicks, orders))

    def category_totals(self, category: str | None, first_day: int, last_day: int) -> tuple[float, float, float]:
        """Impressions, clicks, orders of ``category`` (None: all) over days ``first_day..last_day``."""
        where, args = ("day BETWEEN ? AND ?", [first_day, last_day])
        if category is not None:
            where, args = where + " AND category = ?", [*args, category]
        row = self.db.execute(f"SELECT TOTAL(impressions), TOTAL(clicks), TOTAL(orders) FROM category_daily "
                              f"WHERE {where}", args).fetchone()
        return row[0], row[1], row[2]

    def category_prices(self, category: str) -> list[float]:
        return [r[0] for r in self.db.execute(
            "SELECT price FROM items WHERE category = ? AND price IS NOT NULL", (category,))]

    # -- interactions --------------------------------------------------------------------------

    def add_interaction(self, item_id: str, t: float, impressions: int = 0, clicks: int = 0,
                        add_to_carts: int = 0, orders: int = 0, sales: float = 0.0) -> None:
        self.db.execute("INSERT INTO interactions VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (item_id, t, impressions, clicks, add_to_carts, orders, sales))
        self.add_category_day(self.category_now(item_id), t, impressions, clicks, orders)

    def interaction_windows(self, item_id: str, t: float, windows_s: Sequence[float]) -> list[tuple[float, ...]]:
        """Per window: sums of (impressions, clicks, add_to_carts, orders, sales) over ``(t - W, t]``."""
        cols = ("impressions", "clicks", "add_to_carts", "orders", "sales")
        sums = ", ".join(f"TOTAL(CASE WHEN event_time > ? THEN {c} END)" for _ in windows_s for c in cols)
        args: list[float | str] = [t - w for w in windows_s for _ in cols]
        row = self.db.execute(f"SELECT {sums} FROM interactions WHERE item_id = ? AND event_time > ? "
                              f"AND event_time <= ?", (*args, item_id, t - max(windows_s), t)).fetchone()
        n = len(cols)
        return [tuple(row[i * n:(i + 1) * n]) for i in range(len(windows_s))]

    # -- snapshots -----------------------------------------------------------------------------

    def snapshot_at(self, item_id: str, t: float) -> Snapshot | None:
        return self.db.execute("SELECT event_time, impressions, clicks, orders, sales, rating FROM snapshots "
                               "WHERE item_id = ? AND event_time = ?", (item_id, t)).fetchone()

    def snapshot_before(self, item_id: str, t: float, inclusive: bool = True) -> Snapshot | None:
        op = "<=" if inclusive else "<"
        return self.db.execute(f"SELECT event_time, impressions, clicks, orders, sales, rating FROM snapshots "
                               f"WHERE item_id = ? AND event_time {op} ? ORDER BY event_time DESC LIMIT 1",
                               (item_id, t)).fetchone()

    def snapshot_after(self, item_id: str, t: float) -> Snapshot | None:
        return self.db.execute("SELECT event_time, impressions, clicks, orders, sales, rating FROM snapshots "
                               "WHERE item_id = ? AND event_time > ? ORDER BY event_time LIMIT 1",
                               (item_id, t)).fetchone()

    def first_snapshot(self, item_id: str) -> Snapshot | None:
        return self.snapshot_after(item_id, float("-inf"))

    def add_snapshot(self, item_id: str, snap: Snapshot) -> None:
        self.db.execute("INSERT INTO snapshots VALUES (?, ?, ?, ?, ?, ?, ?)", (item_id, *snap))

    def rating_before(self, item_id: str, t: float) -> float | None:
        row = self.db.execute("SELECT rating FROM snapshots WHERE item_id = ? AND event_time <= ? AND rating "
                              "IS NOT NULL ORDER BY event_time DESC LIMIT 1", (item_id, t)).fetchone()
        return row[0] if row else None

    # -- profile -------------------------------------------------------------------------------

    def add_profile(self, item_id: str, t: float, category: str | None, price: float | None, shop: str | None,
                    shop_score: float | None, rating_count: int | None) -> None:
        self.db.execute("INSERT INTO profile VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (item_id, t, category, price, shop, shop_score, rating_count))
        if category is not None:
            self.db.execute("UPDATE items SET category = ?, category_time = ? WHERE item_id = ? AND "
                            "(category_time IS NULL OR category_time <= ?)", (category, t, item_id, t))
        if price is not None:
            self.db.execute("UPDATE items SET price = ?, price_time = ? WHERE item_id = ? AND "
                            "(price_time IS NULL OR price_time <= ?)", (price, t, item_id, t))

    def profile_before(self, item_id: str, t: float) -> dict[str, object]:
        """Each profile field's latest non-null value at or before ``t``."""
        fields = ("category", "price", "shop", "shop_score", "rating_count")
        out: dict[str, object] = dict.fromkeys(fields)
        rows = self.db.execute("SELECT category, price, shop, shop_score, rating_count FROM profile WHERE "
                               "item_id = ? AND event_time <= ? ORDER BY event_time DESC", (item_id, t))
        missing = set(fields)
        for row in rows:
            for f, v in zip(fields, row, strict=False):
                if f in missing and v is not None:
                    out[f] = v
                    missing.discard(f)
            if not missing:
                break
        return out

    # -- pushed rows ---------------------------------------------------------------------------

    def row_times_after(self, item_id: str, view: str, t: float) -> list[float]:
        return [r[0] for r in self.db.execute("SELECT ts FROM rows WHERE item_id = ? AND view = ? AND ts > ?",
                                              (item_id, view, t))]

    def row_version(self, item_id: str, view: str, ts: float) -> int | None:
        """How many times the row at ``ts`` was re-pushed (0: once), or None if it never was."""
        row = self.db.execute("SELECT version FROM rows WHERE item_id = ? AND view = ? AND ts = ?",
                              (item_id, view, ts)).fetchone()
        return row[0] if row else None

    def put_row(self, item_id: str, view: str, ts: float, version: int, created: float, values: dict) -> None:
        self.db.execute("INSERT OR REPLACE INTO rows VALUES (?, ?, ?, ?, ?, ?)",
                        (item_id, view, ts, version, created, json.dumps(values, separators=(",", ":"))))

    def latest_rows(self) -> Iterator[tuple[str, str, float, dict]]:
        """Each (item, view)'s newest row: item, view, timestamp, values."""
        for item_id, view, ts, vals in self.db.execute(
                "SELECT item_id, view, MAX(ts), vals FROM rows GROUP BY item_id, view"):
            yield item_id, view, ts, json.loads(vals)

    # -- retention -----------------------------------------------------------------------------

    def meta(self, key: str) -> float | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: float) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def prune(self, horizon: float, longest_window_s: float) -> None:
        """Forget what no accepted input can need: ``horizon`` is the oldest accepted event time."""
        data_cutoff = horizon - longest_window_s
        self.db.execute("DELETE FROM seen WHERE event_time < ?", (horizon,))
        self.db.execute("DELETE FROM interactions WHERE event_time <= ?", (data_cutoff,))
        self.db.execute("DELETE FROM snapshots WHERE event_time < ? AND event_time < (SELECT MAX(s.event_time) "
                        "FROM snapshots s WHERE s.item_id = snapshots.item_id AND s.event_time < ?)",
                        (data_cutoff, data_cutoff))
        self.db.execute("DELETE FROM category_daily WHERE day < ?", (day_of(data_cutoff) - 1,))
        self.db.execute("DELETE FROM rows WHERE ts < ? AND ts < (SELECT MAX(r.ts) FROM rows r WHERE "
                        "r.item_id = rows.item_id AND r.view = rows.view)", (horizon,))


__all__ = ["AggregatorState", "DAY", "SNAPSHOT_COUNTERS", "Snapshot", "day_of"]
