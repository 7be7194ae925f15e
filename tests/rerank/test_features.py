"""Request features from the candidate list, store features through ``FeatureReader`` (missing → NaN)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rerank.features import (
    CONTEXT_FEATURES,
    FeatureReader,
    InMemoryFeatureReader,
    candidate_matrix,
    category_vote,
    context_features,
    feature_names,
)
from tests.rerank.rerank_testlib import hit

COL = {n: i for i, n in enumerate(CONTEXT_FEATURES)}


def candidates():
    return [
        hit("a", 0.90, category="Apple", price=10.0),
        hit("b", 0.88, category="Apple", price=12.0, duplicate_of="a"),
        hit("c", 0.80, category="Pear", price=None),
        hit("d", 0.75, category="Apple", product_group="P", price=5.0),
        hit("e", 0.70, product_group="P", price=20.0),
    ]


def test_request_features():
    X, groups = context_features(candidates(), "Apple")
    assert X.dtype == np.float32 and X.shape == (5, len(CONTEXT_FEATURES))
    assert groups == [0, 0, 1, 2, 2]
    np.testing.assert_allclose(X[:, COL["visual_score"]], [0.90, 0.88, 0.80, 0.75, 0.70], rtol=1e-6)
    assert X[:, COL["visual_rank"]].tolist() == [0, 1, 2, 3, 4]
    np.testing.assert_allclose(X[:, COL["visual_gap"]], [0, 0.02, 0.10, 0.15, 0.20], atol=1e-6)
    assert X[:4, COL["category_match"]].tolist() == [1, 1, 0, 1] and math.isnan(X[4, COL["category_match"]])
    assert X[:, COL["group_size"]].tolist() == [2, 2, 1, 2, 2]
    assert X[:, COL["in_best_group"]].tolist() == [1, 1, 0, 0, 0]
    assert X[:, COL["near_duplicate"]].tolist() == [0, 1, 0, 0, 0]
    np.testing.assert_allclose(X[:, COL["group_visual_gap"]], [0, 0.02, 0, 0, 0.05], atol=1e-6)
    price_rel = X[:, COL["price_rel_group"]]
    np.testing.assert_allclose(price_rel[[0, 1, 3, 4]], [1.0, 1.2, 1.0, 4.0], rtol=1e-6)
    assert math.isnan(price_rel[2])
    X, _ = context_features(candidates(), None)  # no prediction: unknown, not "no match"
    assert np.isnan(X[:, COL["category_match"]]).all()


def test_store_features_missing_items_and_values_are_nan():
    reader = InMemoryFeatureReader({"a": {"rating": 4.5, "ctr": None}, "c": {"rating": 2.0, "ctr": 0.1}})
    cm = candidate_matrix(candidates(), "Apple", reader, ["rating", "ctr"])
    store = cm.X[:, len(CONTEXT_FEATURES):]
    assert cm.X.shape == (5, len(CONTEXT_FEATURES) + 2)
    assert store[0, 0] == 4.5 and math.isnan(store[0, 1])
    assert np.isnan(store[1]).all() and np.isnan(store[3:]).all()  # unknown to the store
    assert store[2].tolist() == pytest.approx([2.0, 0.1])
    assert cm.coverage == pytest.approx(2 / 5)


def test_any_object_with_online_is_a_feature_reader():
    class Feast:  # the shape of the feature store's reader
        def online(self, item_ids):
            return {i: {"rating": 3.0} for i in item_ids}

    assert isinstance(InMemoryFeatureReader(), FeatureReader)
    assert isinstance(Feast(), FeatureReader)
    assert candidate_matrix(candidates(), None, Feast(), ["rating"]).coverage == 1.0


def test_feature_names_refuse_clashes_and_duplicates():
    assert feature_names(["rating"]) == [*CONTEXT_FEATURES, "rating"]
    with pytest.raises(ValueError, match="clash"):
        feature_names(["visual_score"])
    with pytest.raises(ValueError, match="duplicate"):
        feature_names(["rating", "rating"])


def test_category_vote_weighs_the_best_candidates():
    hits = [hit("a", 0.9, category="Apple"), hit("b", 0.7, category="Pear"), hit("c", 0.69, category="Pear")]
    assert category_vote(hits) == "Apple"
    assert category_vote([]) is None
