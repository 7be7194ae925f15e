"""The item features, named once: what the store keeps, what the re-ranker reads, and the read
interface the re-ranker depends on. No Feast import here, so ``rerank/`` can import the names
cheaply (Feast itself takes seconds to import).

``FEATURES`` is the re-ranker's tuple, in a fixed order (its model's column order):

- behaviour (view ``item_behaviour``): ``{impressions,clicks,add_to_carts,orders,sales}_{1,7,30}d``,
  counted over the rolling window ``(t - W, t]`` ending at the row's time, and ``ctr_{7,30}d`` /
  ``cvr_{7,30}d`` smoothed toward the item's category prior
  (``ctr = (clicks + m·prior_ctr) / (impressions + m)``, ``cvr = (orders + m'·prior_cvr) / (clicks + m')``,
  see ``feature_store.aggregator``);
- profile (view ``item_profile``): ``price``, ``price_to_category_median``, ``rating``,
  ``rating_count``, ``shop_score`` and ``item_age_days``. The store keeps ``first_seen_at`` (unix
  seconds) and ``item_age_days`` is derived from it at read time (``now`` online, the entity row's
  timestamp offline), because an age written at push time would be stale a day later.

A value is ``None`` when the store has nothing for it, or only a row older than its view's TTL: the
re-ranker falls back (to the prior, to the visual order), it never sees a stale number.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

WINDOWS_DAYS = (1, 7, 30)
LONGEST_WINDOW_S = max(WINDOWS_DAYS) * 86400.0
COUNTERS = ("impressions", "clicks", "add_to_carts", "orders", "sales")
COUNTER_FEATURES = tuple(f"{c}_{w}d" for c in COUNTERS for w in WINDOWS_DAYS)
RATE_FEATURES = ("ctr_7d", "ctr_30d", "cvr_7d", "cvr_30d")
BEHAVIOUR_FEATURES = COUNTER_FEATURES + RATE_FEATURES

# What the profile view stores, and what the re-ranker reads of it (age derived from first_seen_at).
PROFILE_STORED = ("price", "price_to_category_median", "rating", "rating_count", "shop_score", "first_seen_at")
PROFILE_FEATURES = ("price", "price_to_category_median", "rating", "rating_count", "shop_score", "item_age_days")

FEATURES: tuple[str, ...] = BEHAVIOUR_FEATURES + PROFILE_FEATURES
"""The re-ranker's feature tuple (its column order)."""

BEHAVIOUR_VIEW = "item_behaviour"
PROFILE_VIEW = "item_profile"
VIEWS: Mapping[str, tuple[str, ...]] = {BEHAVIOUR_VIEW: BEHAVIOUR_FEATURES, PROFILE_VIEW: PROFILE_STORED}
INTEGER_FEATURES = frozenset(f"{c}_{w}d" for c in COUNTERS if c != "sales" for w in WINDOWS_DAYS)

ItemFeatures = dict[str, float | int | None]


def view_of(feature: str) -> str:
    """The view that stores ``feature`` (``item_age_days`` lives in the profile as ``first_seen_at``)."""
    if feature == "item_age_days":
        return PROFILE_VIEW
    for view, names in VIEWS.items():
        if feature in names:
            return view
    raise KeyError(f"unknown feature {feature!r} (known: {', '.join(FEATURES)})")


def age_days(first_seen_at: float | None, as_of: float) -> float | None:
    """Days from ``first_seen_at`` to ``as_of`` (never negative), or None when never seen."""
    if first_seen_at is None:
        return None
    return max(0.0, (as_of - first_seen_at) / 86400.0)


class FeatureReader(Protocol):
    """What the re-ranker needs of the store (``feature_store.store.ItemFeatureStore`` is one)."""

    def online(self, item_ids: Sequence[str]) -> dict[str, ItemFeatures]:
        """Every feature of ``FEATURES`` for each item the store knows; an unknown item is absent,
        an unknown or expired value is None."""
        ...


__all__ = ["BEHAVIOUR_FEATURES", "BEHAVIOUR_VIEW", "COUNTERS", "COUNTER_FEATURES", "FEATURES", "FeatureReader",
           "INTEGER_FEATURES", "ItemFeatures", "LONGEST_WINDOW_S", "PROFILE_FEATURES", "PROFILE_STORED",
           "PROFILE_VIEW", "RATE_FEATURES", "VIEWS", "WINDOWS_DAYS", "age_days", "view_of"]
