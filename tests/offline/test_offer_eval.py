"""The real visual search over the SIMULATED offers (``offline.simulate.photo_search``) and
``make eval``'s offers section (``offline.simulate.offer_eval``): val shop photos through the
production ingest, index, model and re-ranker; only the offers and their gains are simulated."""

import json

import pytest
from pydantic import ValidationError

from events.models import ItemUpserted
from offline.datasets import GroceryDataset
from offline.evaluate import evaluate
from offline.simulate.__main__ import main as simulate_main
from offline.simulate.catalog import products_from_grocery, simulate_offers
from offline.simulate.offer_eval import evaluate_offers, read_state
from offline.simulate.photo_search import OfferIndexSearch
from offline.simulate.shoppers import daily_queries
from tongkuan.config import ToolConfig
from vision.settings import RuntimeSettings


@pytest.fixture(scope="module")
def offer_search(grocery, model_dir):
    products = [p for p in products_from_grocery(grocery, query_split="val") if p.query_photos][:12]
    offers = simulate_offers(products, seed=3)
    with OfferIndexSearch(offers, GroceryDataset(grocery).dir) as search:
        yield products, offers, search


def test_offers_go_through_ingest_with_their_twin_links_and_product_keys(offer_search):
    products, offers, search = offer_search
    assert search.items == len(offers) and not search.report.failures
    records = {r.item_id: r for r in search.index.retrieve([o.item_id for o in offers])}
    assert set(records) == {o.item_id for o in offers}
    for o in offers:
        payload = records[o.item_id].payload
        assert payload["price"] == o.price and payload["shop"] == o.shop
        assert payload.get("product_group") == o.product_group
        if o.duplicate_of:  # the same image file: ingest's md5 finds the twin, not the simulator
            assert payload["duplicate_of"] == o.duplicate_of


def test_val_photos_find_their_offers_and_repeat_searches_are_served_once(offer_search):
    products, offers, search = offer_search
    queries = daily_queries(products, 0, 40, seed=1)
    assert all(q.photo in {p for prod in products for p in prod.query_photos} for q in queries)
    first = 0
    for q in queries:
        hits = search(q)
        assert hits and all(a.score >= b.score for a, b in zip(hits, hits[1:], strict=False))
        first += hits[0].item_id.split("#")[0] == q.product_id
        assert search(q) == hits
    assert first / len(queries) >= 0.6  # real cosines: the shipped model finds most products first
    assert search.cache_hits >= len(queries)
    with pytest.raises(ValueError, match="no photo"):
        search(queries[0].__class__("x", products[0].product_id, 0, 0.0, None))


def test_the_product_key_is_an_optional_validated_field_of_the_event():
    base = {"item_id": "a", "version": 1, "title": "t", "category_path": ["Fruit"], "images": ["a.jpg"]}
    assert ItemUpserted(**base).to_item().product_group is None
    assert ItemUpserted(**base, product_group="spu-1").to_item().product_group == "spu-1"
    with pytest.raises(ValidationError):
        ItemUpserted(**base, product_group=" spu-1")


@pytest.fixture(scope="module")
def simulated(grocery, model_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("photo-loop")
    argv = ["loop", "--data", str(grocery), "--days", "2", "--queries", "120", "--store", "memory",
            "--report", str(d / "simulate.json"), "--models", str(d / "models"), "--state", str(d / "state.json")]
    assert simulate_main(argv) == 0
    return d


def test_the_loop_searches_val_photos_through_the_real_index_and_leaves_its_state(simulated):
    report = json.loads((simulated / "simulate.json").read_text())
    assert report["search"]["search"].startswith("real") and report["search"]["items"] == report["catalog"]["offers"]
    assert report["search"]["distinct_photos"] > 50
    assert report["catalog"]["products"] == 81 and report["catalog"]["searched_products"] < 81
    state = read_state(simulated / "state.json")
    assert state["simulated"] is True and state["ranker_version"] == "v0002" and state["tie_margin"] == 0.02
    assert len(state["features"]) == report["catalog"]["offers"]
    for key in ("ndcg@10", "product_first_r1"):
        assert report[key]["oracle"] >= report[key]["visual"] - 1e-9


def test_eval_reports_the_active_ranker_on_the_splits_photos(simulated, grocery):
    out = evaluate_offers(grocery, "val", models_dir=simulated / "models", state_path=simulated / "state.json")
    assert out["simulated"] is True and out["ranker_version"] == "v0002"
    assert out["queries"] == len(GroceryDataset(grocery).split("val"))
    assert out["rankers"] == {"lightgbm:v0002": out["queries"]}
    assert out["offers_with_features"] == out["offers"]
    # the ordering rule keeps the best visual product first: the ranker cannot cost a point
    assert out["product_first_r1"]["delta"] >= -0.01
    assert out["ndcg@10"]["oracle"] >= max(out["ndcg@10"]["visual"], out["ndcg@10"]["ranker"]) - 1e-9
    assert out["kendall_tau"]["oracle"] == pytest.approx(1.0)


def test_eval_without_a_model_serves_visual_order_and_says_so(simulated, grocery, tmp_path):
    out = evaluate_offers(grocery, "val", models_dir=tmp_path / "empty", state_path=simulated / "state.json")
    assert out["ranker_version"] is None and out["rankers"] == {"visual-fallback:no_model": out["queries"]}
    assert out["ndcg@10"]["ranker"] == out["ndcg@10"]["visual"] and out["product_first_r1"]["delta"] == 0


def test_a_state_of_another_build_is_refused(simulated, grocery, tmp_path):
    state = json.loads((simulated / "state.json").read_text())
    (tmp_path / "old.json").write_text(json.dumps({**state, "state_version": 0}))
    with pytest.raises(ValueError, match="make simulate again"):
        evaluate_offers(grocery, "val", models_dir=simulated / "models", state_path=tmp_path / "old.json")


def test_make_eval_says_when_there_is_no_simulation_to_evaluate(grocery, model_dir, tmp_path):
    cfg = ToolConfig(runtime=RuntimeSettings(model_dir=model_dir))
    metrics = evaluate(grocery, "val", cfg=cfg, out_dir=tmp_path, progress=False, photo_to_photo=False,
                       offers=(tmp_path / "models", tmp_path / "missing.json"))
    assert "no simulation state" in metrics["offers"]["skipped"]
