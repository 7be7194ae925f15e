"""The stream aggregator: feature inputs → feature rows in **event time** → Feast push sources.

``ItemFeatureAggregator.ingest(batch)`` validates each input (``feature_store.inputs``), applies
the accepted ones to its state (``feature_store.state``), recomputes the feature rows they affect
*as of their own timestamps*, and pushes them through ``ItemFeatureStore.push``: every recomputed
row to the offline store, each item's newest row to the online store. It returns an
``IngestReport``: counts, and a ``Rejection`` (reason, detail, batch index) per refused input; the
rest of the batch goes on.

**Windows.** ``{counter}_{W}d`` as of ``t`` counts ``(t - W, t]``:

- interactions (``search.interactions``) are increments at their event time: an impression per
  item shown, a click / add-to-cart / order per engagement, an order's amount into ``sales``;
- the marketplace's counters (``ItemFeaturesUpdated``) are absolute: the window's count is
  ``snapshot(≤ t) - snapshot(≤ t - W)``; an item's first snapshot is its *baseline* (what it
  counted before the store existed is in no window), and of snapshots in time order each counter
  must not decrease (else ``counters_not_monotonic``);
- the two add up: they are taken to count disjoint traffic (tongkuan's search results vs the
  marketplace's other surfaces). A marketplace whose counters include tongkuan's traffic should
  not also send interactions for the same counters.

**Rates.** ``ctr_W = (clicks_W + m·p_ctr) / (impressions_W + m)``, ``cvr_W = (orders_W + m'·p_cvr) /
(clicks_W + m')``, with ``m``, ``m'`` from the settings and the prior ``p`` of the item's category
(``inputs.category_of``: the top two levels) over the 30 complete UTC days before the row's day
(complete days: a prior never counts what happened after its row), itself smoothed toward the
global prior, which is smoothed toward the settings' defaults, each with the same strength.

**Late and out-of-order events.** An event is accepted when ``now - max_lateness_s <= event_time
<= now + max_future_s`` (default: 30 days, the longest window, and 5 minutes): it lands in its own
window — the row at its time and every row of that item already pushed after it are recomputed and
re-pushed, each as a new version (``row_timestamp``: 1 µs later than the last, a newer
``created_at``), and the item's newest row is re-pushed online. Older is ``too_old``; further ahead is ``in_future``.
Not recomputed: other items' rows whose category prior a late event changes, and the category
price median (taken over current prices when a row is computed).

**Redelivery.** Each input's event id (``inputs.event_id_of``) is recorded in the same SQLite
transaction as its effect, and the pushes run inside that transaction: a redelivered input is a
``duplicate`` and changes nothing; if a push fails, nothing is recorded and the whole batch can be
redelivered. A redelivery older than the horizon is refused as ``too_old``, never counted twice.

**Refresh.** Windows slide without events: ``refresh()`` (run hourly by the consumer) pushes, as of
now, every item whose values changed since its last row, and re-pushes unchanged rows before they
reach their view's TTL (an item whose behaviour is all zero is left to expire).

**Volume.** By default every event time of an item is a row (exact point-in-time features; an
impression of 60 items is 60 behaviour rows). ``row_resolution_s`` > 0 coalesces an item's rows into
one per bucket, stamped with the bucket's end.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pandas as pd

from events.models import ItemFeaturesUpdated, ItemUpserted
from feature_store.definitions import TTLS
from feature_store.features import (
    BEHAVIOUR_FEATURES,
    BEHAVIOUR_VIEW,
    COUNTER_FEATURES,
    COUNTERS,
    LONGEST_WINDOW_S,
    PROFILE_VIEW,
    WINDOWS_DAYS,
)
from feature_store.inputs import (
    CONFLICTING,
    IN_FUTURE,
    NOT_MONOTONIC,
    TOO_OLD,
    FeatureInput,
    ItemProfileUpdated,
    Rejection,
    ResultEngaged,
    ResultsShown,
    category_of,
    event_id_of,
    parse_input,
)
from feature_store.settings import AggregatorSettings
from feature_store.state import DAY, SNAPSHOT_COUNTERS, AggregatorState, Snapshot, day_of
from feature_store.store import ItemFeatureStore, PushMode

WINDOWS_S = tuple(d * DAY for d in WINDOWS_DAYS)
PRUNE_EVERY_S = 600.0
_PRIOR_DAYS = 30


@dataclass
class IngestReport:
    """What one ``ingest`` did. ``rows``: feature rows pushed offline; ``online_rows``: online."""

    accepted: int = 0
    duplicates: int = 0
    rejections: list[Rejection] = field(default_factory=list)
    rows: int = 0
    online_rows: int = 0


class _Batch:
    """Per-batch caches (priors, medians) and the (item, view) → row times to recompute."""

    def __init__(self, resolution_s: float = 0.0) -> None:
        self.resolution_s = resolution_s
        self.touched: dict[tuple[str, str], set[float]] = defaultdict(set)
        self.priors: dict[tuple[str, int], tuple[float, float]] = {}
        self.medians: dict[str, float | None] = {}

    def touch(self, item_id: str, view: str, t: float) -> None:
        """``item``'s ``view`` changes at ``t``: its row at ``t`` (or at the end of ``t``'s bucket)."""
        r = self.resolution_s
        self.touched[(item_id, view)].add(t if r == 0 else math.ceil(t / r) * r)


class ItemFeatureAggregator:
    def __init__(self, store: ItemFeatureStore, settings: AggregatorSettings | None = None, *,
                 clock: Callable[[], float] | None = None) -> None:
        self.store = store
        self.settings = s = settings or AggregatorSettings()
        self.clock = clock or store.clock
        for view, keepalive in ((BEHAVIOUR_VIEW, s.behaviour_keepalive_s), (PROFILE_VIEW, s.profile_keepalive_s)):
            if keepalive >= TTLS[view].total_seconds():
                raise ValueError(f"{view} keepalive {keepalive:.0f} s must be under its TTL {TTLS[view]}")
        self.keepalive = {BEHAVIOUR_VIEW: s.behaviour_keepalive_s, PROFILE_VIEW: s.profile_keepalive_s}
        self.state = AggregatorState(s.state_path or store.data_dir / "aggregator.db")

    def close(self) -> None:
        self.state.close()

    # -- ingest --------------------------------------------------------------------------------

    def ingest(self, inputs: Sequence[bytes | str | dict | FeatureInput], *, replay: bool = False) -> IngestReport:
        """Apply a batch (records, decoded dicts or models). ``replay`` (backfill): "now" is the
        batch's newest event time (capped at the clock), and a row computed for the first time
        is stamped ``created_at`` = its own timestamp — history loaded as if it had streamed."""
        report = IngestReport()
        good: list[tuple[int, FeatureInput]] = []
        for i, raw in enumerate(inputs):
            parsed = parse_input(raw, i)
            if isinstance(parsed, Rejection):
                report.rejections.append(parsed)
            else:
                good.append((i, parsed))
        wall = self.clock()
        now = min(wall, max((e.event_time for _, e in good), default=wall)) if replay else wall
        horizon = now - self.settings.max_lateness_s
        batch = _Batch(self.settings.row_resolution_s)
        with self.state.transaction():
            for i, event in good:
                rejection = self._admit(i, event, wall, horizon)
                if rejection is not None:
                    report.rejections.append(rejection)
                    continue
                if not self.state.mark_seen(event_id_of(event), event.event_time):
                    report.duplicates += 1
                    continue
                self._apply(event, batch)
                report.accepted += 1
            self._publish(batch, now, replay, report)
            self._maybe_prune(now)
        return report

    def _admit(self, i: int, event: FeatureInput, wall: float, horizon: float) -> Rejection | None:
        t = event.event_time
        eid = event_id_of(event)
        item = getattr(event, "item_id", None)
        if t > wall + self.settings.max_future_s:
            return Rejection(IN_FUTURE, f"event_time {t:.3f} is {t - wall:.0f} s after now (accepted: up to "
                             f"{self.settings.max_future_s:.0f} s)", i, eid, item)
        if t < horizon:
            return Rejection(TOO_OLD, f"event_time {t:.3f} is {horizon - t:.0f} s older than the oldest accepted "
                             f"({self.settings.max_lateness_s:.0f} s before now)", i, eid, item)
        if isinstance(event, ItemFeaturesUpdated):
            return self._check_snapshot(i, event, eid)
        return None

    def _check_snapshot(self, i: int, event: ItemFeaturesUpdated, eid: str) -> Rejection | None:
        item, t = event.item_id, event.event_time
        same = self.state.snapshot_at(item, t)
        if same is not None:
            if same == _snapshot(event):
                return None  # the same snapshot again: a redelivery (the seen check counts it)
            return Rejection(CONFLICTING, f"another snapshot of {item} at {t} has different counters", i, eid, item)
        before = self.state.snapshot_before(item, t, inclusive=False)
        after = self.state.snapshot_after(item, t)
        new = _snapshot(event)
        for k, name in enumerate(SNAPSHOT_COUNTERS, start=1):
            if before is not None and new[k] < before[k]:
                return Rejection(NOT_MONOTONIC, f"{name} {new[k]} < {before[k]} at the earlier {before[0]}", i, eid,
                                 item)
            if after is not None and new[k] > after[k]:
                return Rejection(NOT_MONOTONIC, f"{name} {new[k]} > {after[k]} at the later {after[0]}", i, eid, item)
        return None

    def _apply(self, event: FeatureInput, batch: _Batch) -> None:
        t = event.event_time
        if isinstance(event, ResultsShown):
            for item in event.item_ids:
                self._seen(item, t, batch)
                self.state.add_interaction(item, t, impressions=1)
                batch.touch(item, BEHAVIOUR_VIEW, t)
        elif isinstance(event, ResultEngaged):
            self._seen(event.item_id, t, batch)
            self.state.add_interaction(event.item_id, t, clicks=int(event.kind == "click"),
                                       add_to_carts=int(event.kind == "add_to_cart"),
                                       orders=int(event.kind == "order"), sales=event.amount or 0.0)
            batch.touch(event.item_id, BEHAVIOUR_VIEW, t)
        elif isinstance(event, ItemFeaturesUpdated):
            self._seen(event.item_id, t, batch)
            if self.state.snapshot_at(event.item_id, t) is None:
                self._add_snapshot(event.item_id, _snapshot(event))
            batch.touch(event.item_id, BEHAVIOUR_VIEW, t)
            if event.counters.rating is not None:
                batch.touch(event.item_id, PROFILE_VIEW, t)
        else:
            self._apply_profile(event, batch)

    def _apply_profile(self, event: ItemUpserted | ItemProfileUpdated, batch: _Batch) -> None:
        item, t = event.item_id, event.event_time
        self._seen(item, t, batch)
        if isinstance(event, ItemUpserted):
            category, shop_score, rating_count = category_of(event.category_path), None, None
        else:
            category, shop_score, rating_count = event.category, event.shop_score, event.rating_count
        if category is not None and category != self.state.profile_before(item, t)["category"]:
            batch.touch(item, BEHAVIOUR_VIEW, t)  # its prior changes
        self.state.add_profile(item, t, category, event.price, event.shop, shop_score, rating_count)
        batch.touch(item, PROFILE_VIEW, t)

    def _seen(self, item: str, t: float, batch: _Batch) -> None:
        if self.state.see_item(item, t):
            batch.touch(item, PROFILE_VIEW, t)  # its first-seen time (item age) changed

    def _add_snapshot(self, item: str, new: Snapshot) -> None:
        """Insert a snapshot and move the category's daily increments it changes: its own delta
        (from the snapshot before it) at its day, and the next snapshot's delta at that one's day."""
        before = self.state.snapshot_before(item, new[0], inclusive=False)
        after = self.state.snapshot_after(item, new[0])
        category = self.state.category_now(item)
        if before is not None:
            d = [new[k] - before[k] for k in (1, 2, 3)]
            self.state.add_category_day(category, new[0], *d)
            if after is not None:
                self.state.add_category_day(category, after[0], *(-x for x in d))
        elif after is not None:  # the new one is the baseline now; the old baseline gets a delta
            self.state.add_category_day(category, after[0], *(after[k] - new[k] for k in (1, 2, 3)))
        self.state.add_snapshot(item, new)

    # -- rows ----------------------------------------------------------------------------------

    def behaviour(self, item: str, t: float, batch: _Batch | None = None) -> dict[str, float | int]:
        """The behaviour row of ``item`` as of ``t``, from the state."""
        batch = batch or _Batch()
        inter = self.state.interaction_windows(item, t, WINDOWS_S)
        last = self.state.snapshot_before(item, t)
        first = self.state.first_snapshot(item) if last is not None else None
        out: dict[str, float | int] = {}
        sums: dict[str, dict[int, float]] = {c: {} for c in COUNTERS}
        for w_days, w_s, row in zip(WINDOWS_DAYS, WINDOWS_S, inter, strict=False):
            snap = [0.0, 0.0, 0.0, 0.0]  # impressions, clicks, orders, sales
            if last is not None and first is not None:
                anchor = self.state.snapshot_before(item, t - w_s) or first
                snap = [last[k] - anchor[k] for k in (1, 2, 3, 4)]
            values = {"impressions": row[0] + snap[0], "clicks": row[1] + snap[1], "add_to_carts": row[2],
                      "orders": row[3] + snap[2], "sales": row[4] + snap[3]}
            for c in COUNTERS:
                sums[c][w_days] = values[c]
        for c in COUNTERS:
            for w in WINDOWS_DAYS:
                v = sums[c][w]
                out[f"{c}_{w}d"] = float(v) if c == "sales" else int(round(v))
        category = self.state.profile_before(item, t)["category"]
        p_ctr, p_cvr = self._priors(category, day_of(t), batch)  # type: ignore[arg-type]
        m, m2 = self.settings.ctr_prior_strength, self.settings.cvr_prior_strength
        for w in (7, 30):
            out[f"ctr_{w}d"] = (out[f"clicks_{w}d"] + m * p_ctr) / (out[f"impressions_{w}d"] + m)
            out[f"cvr_{w}d"] = (out[f"orders_{w}d"] + m2 * p_cvr) / (out[f"clicks_{w}d"] + m2)
        return {f: out[f] for f in BEHAVIOUR_FEATURES}

    def _priors(self, category: str | None, day: int, batch: _Batch) -> tuple[float, float]:
        key = (category or "", day)
        if key not in batch.priors:
            s = self.settings
            m, m2 = s.ctr_prior_strength, s.cvr_prior_strength
            first, last = day - _PRIOR_DAYS, day - 1
            gi, gc, go = self.state.category_totals(None, first, last)
            p_ctr, p_cvr = (gc + m * s.default_ctr) / (gi + m), (go + m2 * s.default_cvr) / (gc + m2)
            if category:
                ci, cc, co = self.state.category_totals(category, first, last)
                p_ctr, p_cvr = (cc + m * p_ctr) / (ci + m), (co + m2 * p_cvr) / (cc + m2)
            batch.priors[key] = (p_ctr, p_cvr)
        return batch.priors[key]

    def profile(self, item: str, t: float, batch: _Batch | None = None) -> dict[str, float | None]:
        """The profile row of ``item`` as of ``t``, from the state."""
        batch = batch or _Batch()
        p = self.state.profile_before(item, t)
        known = self.state.item(item)
        price, category = p["price"], p["category"]
        median = None
        if category is not None:
            if category not in batch.medians:
                prices = self.state.category_prices(category)  # type: ignore[arg-type]
                batch.medians[category] = statistics.median(prices) if prices else None  # type: ignore[assignment]
            median = batch.medians[category]
        rating_count = p["rating_count"]
        return {"price": price, "price_to_category_median": (price / median) if price is not None and median else None,
                "rating": self.state.rating_before(item, t), "shop_score": p["shop_score"],
                "rating_count": float(rating_count) if rating_count is not None else None,  # type: ignore[arg-type]
                "first_seen_at": known[0] if known else None}

    def _row(self, view: str, item: str, t: float, batch: _Batch) -> dict:
        return self.behaviour(item, t, batch) if view == BEHAVIOUR_VIEW else self.profile(item, t, batch)

    def _publish(self, batch: _Batch, now: float, replay: bool, report: IngestReport) -> None:
        rows: dict[str, list[dict]] = {BEHAVIOUR_VIEW: [], PROFILE_VIEW: []}
        newest: dict[str, list[dict]] = {BEHAVIOUR_VIEW: [], PROFILE_VIEW: []}
        for (item, view), times in sorted(batch.touched.items()):
            stamps = sorted(times | set(self.state.row_times_after(item, view, min(times))))
            for ts in stamps:
                values = self._row(view, item, ts, batch)
                old = self.state.row_version(item, view, ts)
                version = 0 if old is None else old + 1
                created = ts if replay and old is None else now
                self.state.put_row(item, view, ts, version, created, values)
                rows[view].append({"item_id": item, "event_timestamp": row_timestamp(ts, version),
                                   "created_at": created, **values})
            newest[view].append(rows[view][-1])
        # Online first: the newest rows are what serving waits for; the Parquet rewrite can follow.
        for view in rows:
            report.online_rows += self.store.push(view, newest[view], to=PushMode.ONLINE)
        for view in rows:
            report.rows += self.store.push(view, rows[view], to=PushMode.OFFLINE)

    # -- refresh, retention --------------------------------------------------------------------

    def refresh(self, as_of: float | None = None) -> int:
        """Push, as of ``as_of`` (default now), the rows that changed since each item's newest row
        or that near their TTL. Returns how many rows it pushed."""
        now = self.clock() if as_of is None else as_of
        batch = _Batch()
        rows: dict[str, list[dict]] = {BEHAVIOUR_VIEW: [], PROFILE_VIEW: []}
        with self.state.transaction():
            for item, view, ts, old in list(self.state.latest_rows()):
                if ts >= now:
                    continue
                values = self._row(view, item, now, batch)
                if view == BEHAVIOUR_VIEW and not any(values[f] for f in COUNTER_FEATURES) \
                        and not any(old.get(f) for f in COUNTER_FEATURES):
                    continue  # nothing in any window, already pushed as such: let it expire
                if _same(values, old) and now - ts < self.keepalive[view]:
                    continue
                self.state.put_row(item, view, now, 0, now, values)
                rows[view].append({"item_id": item, "event_timestamp": now, "created_at": now, **values})
            pushed = sum(self.store.push(view, r, to=PushMode.ONLINE_AND_OFFLINE) for view, r in rows.items())
            self._maybe_prune(now)
        return pushed

    def _maybe_prune(self, now: float) -> None:
        last = self.state.meta("pruned_at")
        if last is not None and now - last < PRUNE_EVERY_S:
            return
        self.state.prune(now - self.settings.max_lateness_s - self.settings.max_future_s, LONGEST_WINDOW_S)
        self.state.set_meta("pruned_at", now)


def row_timestamp(ts: float, version: int) -> pd.Timestamp:
    """The ``event_timestamp`` a row's ``version``-th push carries: its time in whole microseconds
    (as ``store.to_utc`` converts unix seconds) plus ``version`` µs. Each re-push of a corrected
    row thus has a later timestamp of its own instead of relying on ``created_at`` to break a tie:
    Feast 0.67's file offline store sorts by ``created_at`` and then, not stably, by the event
    timestamp, so between equal timestamps it keeps an arbitrary version (seen: 5 versions of one
    row, the newest kept for 2 of 20 items)."""
    return pd.Timestamp(round(ts * 1e6) + version, unit="us", tz="UTC")


def _snapshot(event: ItemFeaturesUpdated) -> Snapshot:
    c = event.counters
    return (event.event_time, c.impressions, c.clicks, c.orders, float(c.sales), c.rating)


def _same(a: dict, b: dict) -> bool:
    for k, v in a.items():
        w = b.get(k)
        if v is None or w is None:
            if v is not w:
                return False
        elif not math.isclose(v, w, rel_tol=1e-12, abs_tol=1e-12):
            return False
    return True


__all__ = ["IngestReport", "ItemFeatureAggregator"]
