"""``LightGBMReranker``: activation refuses bad models and keeps the serving one, fallbacks say so,
``explain`` adds up, and no feature can put another product above the best visual match."""

from __future__ import annotations

import json

import pytest
from prometheus_client import REGISTRY

from offline.simulate.loop import STORE_FEATURES
from offline.simulate.shoppers import daily_queries
from rerank.features import InMemoryFeatureReader
from rerank.groups import product_groups
from rerank.registry import ModelRegistry, ModelRejected
from rerank.reranker import FALLBACK, LightGBMReranker
from rerank.training import train


def fallbacks(reason: str) -> float:
    return REGISTRY.get_sample_value("tongkuan_rerank_fallbacks_total", {"reason": reason}) or 0.0


def candidates(world, n: int = 1, day: int = 50):
    return [world.search(q) for q in daily_queries(world.products, day, n, seed=3)]


def serving(world, registry) -> LightGBMReranker:
    r = LightGBMReranker(world.reader, store_features=STORE_FEATURES, registry=registry)
    r.activate("v0001")
    return r


def test_an_activated_model_serves_and_is_named(world, registry):
    r = serving(world, registry)
    assert registry.active_version() == "v0001" and r.active_version == "v0001"
    hits = candidates(world)[0]
    result = r.rerank_with_info(hits)
    assert result.ranker == "lightgbm:v0001" and result.fallback_reason is None and r.name == "lightgbm:v0001"
    assert sorted(h.item_id for h in result.hits) == sorted(h.item_id for h in hits)
    assert len(result.scores) == len(hits)
    assert r.rerank(hits) == result.hits  # the Reranker protocol: rerank(hits) -> hits
    # a new process finds the active version by itself
    assert LightGBMReranker(world.reader, store_features=STORE_FEATURES, registry=registry).active_version == "v0001"


def test_manifest_records_the_model(registry, trained):
    m = registry.manifest("v0001")
    assert m.feature_names == trained.feature_names and m.store_features == list(STORE_FEATURES)
    assert m.metrics["holdout"]["truth"]["ndcg@10"]["ranker"] > 0
    assert m.data_window["from"] < m.data_window["to"] and m.data_window["rows"] == trained.data_window["rows"]
    assert m.created_at and len(m.model_sha256) == 64 and m.lightgbm_version


def corrupt_model_text(registry, version):
    path = registry.dir / version / "model.txt"
    path.write_text(path.read_text()[: len(path.read_text()) // 2])


def corrupt_manifest(registry, version):
    (registry.dir / version / "manifest.json").write_text('{"version": "v0002", "feat')


def unparsable_model(registry, version):
    # a model file LightGBM cannot read, with a manifest that vouches for it (sha256 matches)
    import hashlib

    text = "tree\nversion=v4\nnum_class=one\n"
    (registry.dir / version / "model.txt").write_text(text)
    m = json.loads((registry.dir / version / "manifest.json").read_text())
    m["model_sha256"] = hashlib.sha256(text.encode()).hexdigest()
    (registry.dir / version / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("damage", [corrupt_model_text, corrupt_manifest, unparsable_model])
def test_a_corrupt_version_is_refused_and_the_previous_keeps_serving(world, registry, trained, damage):
    r = serving(world, registry)
    trained.publish(registry)  # v0002
    damage(registry, "v0002")
    hits = candidates(world)[0]
    before = r.rerank(hits)
    with pytest.raises(ModelRejected) as e:
        r.activate("v0002")
    assert e.value.reason == "corrupt"
    assert r.active_version == "v0001" and registry.active_version() == "v0001"
    assert r.rerank(hits) == before and r.name == "lightgbm:v0001"


def test_an_incompatible_feature_list_is_refused(world, registry, trained, tmp_path):
    r = serving(world, registry)
    fewer = train(world.table, STORE_FEATURES[:-1], num_rounds=20)
    fewer.publish(registry)  # v0002: one store feature less
    with pytest.raises(ModelRejected) as e:
        r.activate("v0002")
    assert e.value.reason == "incompatible" and r.active_version == "v0001"
    other = LightGBMReranker(world.reader, store_features=["rating"], registry=registry)
    with pytest.raises(ModelRejected, match="incompatible"):
        other.activate("v0001")
    assert other.active_version is None
    trained.publish(registry)  # v0003: a manifest from a newer schema
    path = registry.dir / "v0003" / "manifest.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "schema": 2}))
    with pytest.raises(ModelRejected) as e:
        r.activate("v0003")
    assert e.value.reason == "incompatible" and r.active_version == "v0001"
    with pytest.raises(ModelRejected) as e:
        r.activate("v0042")
    assert e.value.reason == "missing" and r.active_version == "v0001"


def test_a_bad_active_version_at_start_serves_visual_order(world, registry, trained):
    registry.set_active("v0001")
    corrupt_model_text(registry, "v0001")
    r = LightGBMReranker(world.reader, store_features=STORE_FEATURES, registry=registry)
    assert r.active_version is None
    hits = candidates(world)[0]
    assert r.rerank_with_info(hits).ranker == FALLBACK


def test_refresh_follows_the_active_pointer(world, registry, trained):
    r = serving(world, registry)
    follower = LightGBMReranker(world.reader, store_features=STORE_FEATURES, registry=ModelRegistry(registry.dir))
    trained.publish(registry)
    r.activate("v0002")
    assert follower.refresh() and follower.active_version == "v0002"
    assert not follower.refresh()
    trained.publish(registry)
    corrupt_model_text(registry, "v0003")
    registry.set_active("v0003")  # activated by hand, badly
    assert not follower.refresh() and follower.active_version == "v0002"


def test_no_model_falls_back_to_visual_order(world, tmp_path):
    r = LightGBMReranker(world.reader, store_features=STORE_FEATURES, registry=ModelRegistry(tmp_path / "none"))
    hits = candidates(world)[0]
    n = fallbacks("no_model")
    result = r.rerank_with_info(hits)
    assert result.hits == hits and result.ranker == FALLBACK == r.name and result.fallback_reason == "no_model"
    assert result.scores is None and fallbacks("no_model") == n + 1
    with pytest.raises(LookupError):
        r.explain(hits)


def test_missing_features_fall_back_and_single_gaps_do_not(world, registry):
    class Down:
        def online(self, item_ids):
            raise ConnectionError("feature store unreachable")

    hits = candidates(world)[0]
    n = fallbacks("features_unavailable")
    for reader in (Down(), InMemoryFeatureReader()):  # failing; knowing none of the candidates
        r = LightGBMReranker(reader, store_features=STORE_FEATURES, registry=registry)
        r.activate("v0001")
        result = r.rerank_with_info(hits)
        assert result.hits == hits and result.ranker == FALLBACK and result.fallback_reason == "features_unavailable"
    assert fallbacks("features_unavailable") == n + 2
    # half the candidates unknown and a value missing: NaN for the model, which still ranks
    half = InMemoryFeatureReader({h.item_id: world.reader.online([h.item_id])[h.item_id] for h in hits[::2]})
    half.put(hits[0].item_id, {"rating": None})
    r = LightGBMReranker(half, store_features=STORE_FEATURES, registry=registry)
    r.activate("v0001")
    assert r.rerank_with_info(hits).ranker == "lightgbm:v0001"
    strict = LightGBMReranker(half, store_features=STORE_FEATURES, registry=registry, min_feature_coverage=0.9)
    assert strict.rerank_with_info(hits).fallback_reason == "features_unavailable"


def test_explain_contributions_sum_to_the_raw_score(world, registry):
    r = serving(world, registry)
    hits = candidates(world)[0]
    ex = r.explain(hits)
    scores = dict(zip((h.item_id for h in r.rerank_with_info(hits).hits), r.rerank_with_info(hits).scores,
                      strict=True))
    assert [e.item_id for e in ex] == [h.item_id for h in hits]
    for e in ex:
        assert set(e.contributions) == set(r.feature_names)
        assert e.bias + sum(e.contributions.values()) == pytest.approx(e.score, abs=1e-6)
        assert e.score == pytest.approx(scores[e.item_id], abs=1e-6)
    assert len({e.bias for e in ex}) == 1


def test_no_feature_puts_another_product_above_the_best_visual_match(world, registry):
    """Adversarial store: the best visual product's offers look awful, every other offer perfect."""
    r = serving(world, registry)
    for hits in candidates(world, n=40, day=60):
        groups = product_groups(hits)
        best = {h.item_id for h, g in zip(hits, groups, strict=True) if g == 0}
        good = {**dict.fromkeys(STORE_FEATURES, 1e4), "rating": 5.0, "shop_score": 5.0, "ctr_7d": 0.9,
                "ctr_30d": 0.9, "cvr_7d": 0.9, "cvr_30d": 0.9, "price": 1.0, "price_to_category_median": 0.3}
        bad = {**dict.fromkeys(STORE_FEATURES, 0.0), "rating": 1.0, "shop_score": 1.0, "impressions_30d": 1e4,
               "price": 999.0, "price_to_category_median": 5.0}
        reader = InMemoryFeatureReader({h.item_id: bad if h.item_id in best else good for h in hits})
        adversarial = LightGBMReranker(reader, store_features=STORE_FEATURES, registry=registry, tie_margin=0.05)
        adversarial.activate("v0001")
        served = adversarial.rerank_with_info(hits)
        assert served.ranker == "lightgbm:v0001"
        assert {h.item_id for h in served.hits[: len(best)]} == best
        # every product group is shown together
        sgroups = product_groups(served.hits)
        runs = [g for j, g in enumerate(sgroups) if j == 0 or sgroups[j - 1] != g]
        assert len(runs) == len(set(runs))
    assert r.active_version == "v0001"
