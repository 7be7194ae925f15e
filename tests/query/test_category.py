import pytest

from index.base import SearchHit
from query.category import knn_vote, predict_category


def _hit(i, score, shard, cat):
    return SearchHit(item_id=str(i), shard=shard, score=score, payload={"category": cat})


def test_vote_weights_by_similarity():
    hits = [_hit(0, 0.90, "Fruit", "Apple"), _hit(1, 0.70, "Packages", "Milk"), _hit(2, 0.69, "Packages", "Milk")]
    cat, shard = knn_vote(hits, temperature=0.05)
    # one close Apple outweighs two distant Milks at this temperature
    assert max(cat, key=cat.get) == "Apple"
    assert abs(sum(cat.values()) - 1) < 1e-9 and abs(sum(shard.values()) - 1) < 1e-9
    cat, _ = knn_vote(hits, temperature=10.0)  # flat weights: majority wins
    assert max(cat, key=cat.get) == "Milk"


def test_fusion_with_classifier_can_overrule_knn():
    hits = [_hit(0, 0.8, "Fruit", "Apple"), _hit(1, 0.79, "Vegetables", "Pepper")]
    pred = predict_category(hits, classifier={"Pepper": 0.95, "Apple": 0.05}, alpha=0.7)
    assert pred.category == "Pepper" and pred.shard == "Vegetables"
    assert pred.probabilities["Pepper"] == pytest.approx(max(pred.probabilities.values()))


def test_empty():
    assert predict_category([]) is None
