"""The category-fusion study (``offline.fusion``): the grid replays the served prediction, the
choice is made on other folds than it is scored on, and ties keep the shipped settings."""

from __future__ import annotations

import numpy as np

from index.base import SearchHit
from offline.fusion import accuracy, best, folds_by_product, study
from query.category import predict_category
from query.settings import SearchSettings


def _row(truth: str, product: int, neighbours: list[tuple[str, float]], probs: dict[str, float] | None) -> dict:
    hits = [SearchHit(item_id=f"{product}-{i}", shard="S", score=s, payload={"category": c})
            for i, (c, s) in enumerate(neighbours)]
    return {"hits": hits, "probs": probs, "truth": truth, "product": product}


def _world(n: int = 60, seed: int = 0) -> list[dict]:
    """Queries whose first neighbour is often wrong while the next ones agree (a wide vote wins), and
    whose classifier is right two times in three."""
    rng = np.random.default_rng(seed)
    rows = []
    for q in range(n):
        truth, other = ("A", "B") if q % 2 else ("B", "A")
        neighbours = [(other, 0.90)] + [(truth, 0.86 - 0.001 * i) for i in range(6)] + [(other, 0.5)] * 10
        right = rng.random() < 2 / 3
        probs = {truth: 0.8, other: 0.2} if right else {truth: 0.2, other: 0.8}
        rows.append(_row(truth, q % 12, neighbours, probs))
    return rows


def test_accuracy_is_the_served_prediction_replayed():
    rows = _world()
    r = rows[0]
    pred = predict_category(r["hits"], k=5, temperature=0.05, classifier=r["probs"], alpha=0.3)
    assert accuracy([r], 0.3, 5, 0.05) == float(pred.category == r["truth"])
    assert accuracy(rows, 0.0, 1, 0.05) == 0.0  # the nearest neighbour alone is always wrong here
    assert accuracy(rows, 0.0, 7, 0.2) == 1.0   # six agreeing neighbours outvote it


def test_folds_are_disjoint_cover_everything_and_spread_each_product():
    products = [i % 5 for i in range(40)]
    folds = folds_by_product(["x"] * 40, products, 2, seed=1)
    assert sorted(np.concatenate(folds).tolist()) == list(range(40))
    for p in range(5):
        counts = [sum(products[i] == p for i in f) for f in folds]
        assert abs(counts[0] - counts[1]) <= 1


def test_ties_keep_the_default_and_the_study_reports_each_side():
    assert best({(0.5, 25, 0.05): 0.9, (0.0, 100, 0.2): 0.9, (1.0, 5, 0.02): 0.8}, (0.5, 25, 0.05)) == (0.5, 25, 0.05)
    out = study(_world(), default=(0.5, 25, 0.05), folds=2, seed=0)
    p = out["chosen"]["point"]
    assert out["chosen"]["accuracy"] == 1.0 == accuracy(_world(), p["alpha"], p["k"], p["temperature"])
    assert p["alpha"] < 0.5 and p["k"] >= 7  # the wide vote outweighs a classifier right 2 times in 3
    assert out["vote_alone"]["best"]["accuracy"] == 1.0
    assert 0.5 < out["classifier_alone"] < 0.85
    assert out["held_out"]["fusion"] == 1.0 and len(out["held_out"]["points_chosen"]) == 2
    # a model without a classifier head: the vote only
    no_head = [{**r, "probs": None} for r in _world()]
    assert "classifier_alone" not in study(no_head, default=(0.5, 25, 0.05), folds=2, seed=0)


def test_the_vote_temperature_is_a_setting():
    assert SearchSettings().category_temperature == 0.05
    assert SearchSettings(category_temperature=0.1).category_temperature == 0.1
