"""The SIMULATED closed loop (searches → events → features → training → serving), small: the ranker
learns what the visual order cannot see, without losing the product; the features go through the
in-memory store or the real Feast store (its aggregator fed with the loop's events); ``make
simulate``'s report and plot. (The re-rank benchmark: ``test_bench_rerank.py``.)"""

from __future__ import annotations

import json

import pytest

from offline.simulate.__main__ import main as simulate_main
from offline.simulate.__main__ import prepare_models
from offline.simulate.catalog import simulate_offers, synthetic_products
from offline.simulate.loop import STORE_FEATURES, LoopConfig, run_loop
from offline.simulate.search import SimulatedVisualSearch
from rerank.features import InMemoryFeatureReader
from rerank.registry import ModelRegistry


class RecordingStore:
    """A feature store seen only through ``online`` and a write callable (as the Feast one will be)."""

    def __init__(self):
        self.inner = InMemoryFeatureReader()
        self.reads = 0
        self.writes = 0

    def online(self, item_ids):
        self.reads += 1
        return self.inner.online(item_ids)

    def write(self, rows):
        self.writes += 1
        for item_id, values in rows.items():
            self.inner.put(item_id, values)


@pytest.fixture(scope="module")
def loop(tmp_path_factory):
    products = synthetic_products(n_categories=16, per_category=3)
    offers = simulate_offers(products, seed=0)
    store = RecordingStore()
    out = tmp_path_factory.mktemp("loop")
    report = run_loop(products, offers, SimulatedVisualSearch(offers, seed=0), out / "models",
                      config=LoopConfig(days=4, queries_per_day=500, seed=0), reader=store, write=store.write,
                      out_dir=out / "report")
    return report, store, out


def test_the_ranker_learns_in_the_loop_without_losing_the_product(loop):
    report, _, _ = loop
    assert report["simulated"] is True and "SIMULATED" in report["note"]
    assert report["ndcg@10"]["ranker"] > report["ndcg@10"]["visual"] + 0.02
    assert report["product_first_r1"]["ranker"] >= report["product_first_r1"]["visual"] - 0.01
    assert report["kendall_tau"]["ranker"] > report["kendall_tau"]["visual"] + 0.05
    days = report["days"]
    assert [d["day"] for d in days] == [0, 1, 2, 3]
    assert days[0]["ranker"] == "visual-fallback" and days[0]["ndcg@10"]["ranker"] == days[0]["ndcg@10"]["visual"]
    assert [d["ranker"] for d in days[1:]] == ["lightgbm:v0001", "lightgbm:v0002", "lightgbm:v0003"]
    for d in days:
        assert d["impressions"] == 10 * d["queries"] and d["clicks"] >= d["carts"] >= d["orders"] > 0
        assert set(d["ndcg@10"]) == {"visual", "ranker", "oracle"} and d["trained"]["holdout"]["truth"]


def test_the_loop_reads_and_writes_features_through_the_store(loop):
    _, store, _ = loop
    assert store.writes == 1 + 4  # the catalog's, then once a day
    # per search: the logged features, and the ranker's own read from day 1 on (day 0 has no model)
    assert store.reads == 4 * 500 + 3 * 500


def test_the_loop_writes_its_report_plot_and_models(loop):
    report, _, out = loop
    saved = json.loads((out / "report" / "report.json").read_text())
    assert saved["ndcg@10"] == report["ndcg@10"] and len(saved["days"]) == 4
    assert (out / "report" / "ndcg_per_day.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    registry = ModelRegistry(out / "models")
    assert registry.versions() == ["v0001", "v0002", "v0003", "v0004"] and registry.active_version() == "v0004"


def test_the_loop_speaks_the_feature_stores_names():
    from feature_store.features import FEATURES

    assert STORE_FEATURES == tuple(FEATURES)


# -- the Feast store in the loop ------------------------------------------------------------------

@pytest.fixture(scope="module")
def feast_loop(tmp_path_factory):
    from offline.simulate.feast_store import FeastFeatures

    products = synthetic_products(n_categories=8, per_category=3)
    offers = simulate_offers(products, seed=0)
    config = LoopConfig(days=3, queries_per_day=150, seed=0)
    out = tmp_path_factory.mktemp("feast-loop")
    features = FeastFeatures(offers, config, online="sqlite")
    try:
        report = run_loop(products, offers, SimulatedVisualSearch(offers, seed=0), out / "models",
                          config=config, features=features)
        served = features.store.online([o.item_id for o in offers])
        yield report, features, offers, served
    finally:
        features.close()
    assert not features.data_dir.exists()  # its temporary data dir is removed


def test_the_loop_runs_through_the_feast_store_and_its_aggregator(feast_loop):
    from feature_store.store import ItemFeatureStore

    report, features, offers, served = feast_loop
    fs = report["feature_store"]
    assert fs["backend"] == "feast" and fs["online_store"] == "sqlite" and fs["rejected"] == 0
    assert fs["inputs"] > fs["history_inputs"] > 0 and fs["rows_offline"] > 0 and fs["rows_online"] > 0
    assert isinstance(features.reader, ItemFeatureStore)
    days = report["days"]
    assert [d["ranker"] for d in days] == ["visual-fallback", "lightgbm:v0001", "lightgbm:v0002"]
    # every impression and click the shoppers made reached the online store (all within 30 days)
    assert len(served) == len(offers)
    assert sum(r["impressions_30d"] for r in served.values()) == sum(d["impressions"] for d in days)
    assert sum(r["clicks_30d"] for r in served.values()) == sum(d["clicks"] for d in days)
    assert sum(r["add_to_carts_30d"] for r in served.values()) == sum(d["carts"] for d in days)
    # orders: the search's plus the marketplace's other surfaces (history included)
    assert sum(r["orders_30d"] for r in served.values()) > sum(d["orders"] for d in days)
    # the profile: price, category median, rating, shop score, age from the first event
    by_id = {o.item_id: o for o in offers}
    for item_id, row in served.items():
        o = by_id[item_id]
        assert row["price"] == pytest.approx(o.price) and row["price_to_category_median"] > 0
        assert row["item_age_days"] == pytest.approx(o.age_days + 3, abs=0.1)  # 3 simulated days later
        assert (row["rating"] is None) == (row["rating_count"] == 0)
        assert row["shop_score"] is None or 0 <= row["shop_score"] <= 1


def test_the_loop_over_feast_learns_without_losing_the_product(feast_loop):
    report, _, _, _ = feast_loop
    assert report["product_first_r1"]["ranker"] >= report["product_first_r1"]["visual"] - 0.01
    assert report["kendall_tau"]["ranker"] > report["kendall_tau"]["visual"]


# -- make simulate ----------------------------------------------------------------------------------

def test_make_simulate_writes_its_report_plot_and_a_fresh_registry(tmp_path, capsys):
    report_path, models = tmp_path / "reports" / "simulate.json", tmp_path / "var" / "models"
    argv = ["loop", "--synthetic", "--days", "2", "--queries", "80", "--report", str(report_path),
            "--models", str(models), "--fresh"]
    assert simulate_main(argv) == 0
    first = json.loads(report_path.read_text())
    assert simulate_main(argv) == 0  # a rerun empties the registry it left
    printed = capsys.readouterr().out
    assert "NDCG@10" in printed and "mean of days 1-1" in printed and "feast (sqlite online)" in printed
    report = json.loads(report_path.read_text())
    assert report["simulated"] is True and report["feature_store"]["backend"] == "feast"
    for key in ("ndcg@10", "product_first_r1", "kendall_tau"):
        assert set(report[key]) == {"visual", "ranker", "oracle"}
        assert len(report["series"][key]["visual"]) == len(report["series"][key]["ranker"]) == 2
    assert report["ndcg@10"] == first["ndcg@10"]  # deterministic for a seed
    assert len(report["days"]) == 2 and report["runtime_s"] > 0
    plot = tmp_path / "reports" / "simulate-ndcg.png"
    assert report["plot"] == str(plot) and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert ModelRegistry(models).versions() == ["v0001", "v0002"]
    assert simulate_main(argv[:-1]) == 2  # without --fresh an earlier run's registry is refused
    assert "already holds models" in capsys.readouterr().err


def test_fresh_empties_only_a_model_registry(tmp_path):
    models = tmp_path / "models"
    (models / "v0001").mkdir(parents=True)
    (models / "ACTIVE").write_text("v0001\n")
    assert prepare_models(models, fresh=True) is None and not any(models.iterdir())
    (models / "notes.txt").write_text("mine")
    assert "more than a model registry" in prepare_models(models, fresh=True)
    assert (models / "notes.txt").exists()
