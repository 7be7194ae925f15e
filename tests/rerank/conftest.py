"""Fixtures of the re-ranker's tests: a small SIMULATED world (offline.simulate), impressions
logged from it under visual order, and a model trained on them (built once per session)."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import pytest

from offline.simulate.catalog import SimOffer, SimProduct, simulate_offers, synthetic_products
from offline.simulate.loop import STORE_FEATURES, TRUTH, FeatureAggregator, LoopConfig, serve_day
from offline.simulate.search import SimulatedVisualSearch
from offline.simulate.shoppers import daily_queries
from rerank.features import InMemoryFeatureReader
from rerank.registry import ModelRegistry
from rerank.reranker import LightGBMReranker
from rerank.training import TrainResult, train


@dataclass
class World:
    products: list[SimProduct]
    offers: list[SimOffer]
    by_id: dict[str, SimOffer]
    search: SimulatedVisualSearch
    reader: InMemoryFeatureReader
    table: pd.DataFrame


@pytest.fixture(scope="session")
def world() -> World:
    products = synthetic_products(n_categories=16, per_category=3)
    offers = simulate_offers(products, seed=3)
    by_id = {o.item_id: o for o in offers}
    search = SimulatedVisualSearch(offers, seed=3)
    config = LoopConfig(seed=3)
    agg = FeatureAggregator(offers, config)
    reader = InMemoryFeatureReader(agg.rows())
    visual = LightGBMReranker(reader, store_features=STORE_FEATURES)  # no model: visual order
    logs = []
    for day in range(5):
        log = serve_day(daily_queries(products, day, 600, seed=3), search, visual, reader, by_id, config=config)
        agg.end_of_day(day, log.events)
        for item_id, values in agg.rows().items():
            reader.put(item_id, values)
        logs.append(log.rows)
    return World(products, offers, by_id, search, reader, pd.concat(logs, ignore_index=True))


@pytest.fixture(scope="session")
def trained(world: World) -> TrainResult:
    return train(world.table, STORE_FEATURES, truth_column=TRUTH, tie_margin=0.02)


@pytest.fixture
def registry(tmp_path, trained: TrainResult) -> ModelRegistry:
    reg = ModelRegistry(tmp_path / "models")
    trained.publish(reg)
    return reg
