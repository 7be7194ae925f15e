"""A SIMULATOR of a marketplace and its shoppers, for developing the re-ranker offline.

Nothing here is measured from real shoppers: offers, prices, ratings, sales, hidden quality, clicks
and orders are drawn from the distributions written in these modules, with a seed. Figures
computed on it (``run_loop``'s report, the benchmark) say whether the re-ranking machinery works
and learns what the simulation puts in; they say nothing about real shoppers. Every report it
writes carries ``"simulated": true``.

* ``catalog``: products (from the GroceryStore dataset or synthetic) → 2–5 offers each.
* ``search``: a simulated visual search over the offers (``SimulatedVisualSearch``), or any
  ``search(query) -> list[index.base.SearchHit]``.
* ``shoppers``: queries per day and a position-biased click model → impressions, clicks, carts,
  orders with event times.
* ``loop``: the closed loop: days of searches → events → features (a ``FeatureBackend``, read
  through a ``FeatureReader``) → training → the new ranker serving; per-day NDCG@10, product-first
  R@1, Kendall τ, a plot.
* ``feast_store``: the loop's features through the real Feast store (``ItemFeatureStore``, SQLite or
  Redis online) fed by ``ItemFeatureAggregator`` with the simulated events.
* ``bench``: re-rank latency of 60 candidates including the Feast online read, Redis vs SQLite.
"""

from offline.simulate.catalog import (
    SimOffer,
    SimProduct,
    products_from_grocery,
    simulate_offers,
    synthetic_products,
)
from offline.simulate.loop import LoopConfig, run_loop
from offline.simulate.search import SimulatedVisualSearch
from offline.simulate.shoppers import ClickModel, SimEvent, SimQuery, daily_queries, simulate_events

__all__ = [
    "ClickModel",
    "LoopConfig",
    "SimEvent",
    "SimOffer",
    "SimProduct",
    "SimQuery",
    "SimulatedVisualSearch",
    "daily_queries",
    "products_from_grocery",
    "run_loop",
    "simulate_events",
    "simulate_offers",
    "synthetic_products",
]
