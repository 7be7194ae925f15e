"""Category prediction by a weighted vote of the query's nearest neighbours (Pailitao, WeChat Scan),
optionally fused with a classifier's probabilities.

The vote: each of the top-K neighbours adds ``exp(score / temperature)`` to its category; the
normalised sums are probabilities. Fusion: ``alpha * classifier + (1 - alpha) * knn``. Both published
systems report +2 to +6 points of accuracy for the fusion over the classifier alone.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from index.base import SearchHit

DEFAULT_K = 25
DEFAULT_TEMPERATURE = 0.05


@dataclass(frozen=True)
class CategoryPrediction:
    shard: str  # top-level category: which index shard to search
    category: str  # second level (coarse) category, e.g. "Apple"
    confidence: float  # probability of ``category``
    shard_confidence: float  # probability mass of ``shard``
    probabilities: dict[str, float]  # coarse category -> probability


def knn_vote(
    hits: Sequence[SearchHit], *, k: int = DEFAULT_K, temperature: float = DEFAULT_TEMPERATURE
) -> tuple[dict[str, float], dict[str, float]]:
    """(coarse category -> p, shard -> p) from the top-k neighbours' payloads."""
    cat: dict[str, float] = {}
    shard: dict[str, float] = {}
    for h in hits[:k]:
        w = math.exp(h.score / temperature - hits[0].score / temperature)  # stable: best hit weighs 1
        c = str(h.payload.get("category", h.shard))
        cat[c] = cat.get(c, 0.0) + w
        shard[h.shard] = shard.get(h.shard, 0.0) + w
    return _normalise(cat), _normalise(shard)


def _normalise(d: dict[str, float]) -> dict[str, float]:
    total = sum(d.values())
    return {k: v / total for k, v in d.items()} if total > 0 else {}


def predict_category(
    hits: Sequence[SearchHit],
    *,
    k: int = DEFAULT_K,
    temperature: float = DEFAULT_TEMPERATURE,
    classifier: Mapping[str, float] | None = None,
    alpha: float = 0.5,
    shard_of: Mapping[str, str] | None = None,
) -> CategoryPrediction | None:
    """Fuse the KNN vote with optional classifier probabilities (coarse category -> p).
    ``shard_of`` maps coarse category -> shard (needed for categories only the classifier names)."""
    if not hits and not classifier:
        return None
    cat, shard = knn_vote(hits, k=k, temperature=temperature)
    mapping = dict(shard_of or {})
    for h in hits[:k]:
        mapping.setdefault(str(h.payload.get("category", h.shard)), h.shard)
    if classifier:
        keys = set(cat) | set(classifier)
        cat = {c: alpha * classifier.get(c, 0.0) + (1 - alpha) * cat.get(c, 0.0) for c in keys}
        cat = _normalise(cat)
        shard = {}
        for c, p in cat.items():
            s = mapping.get(c)
            if s is not None:
                shard[s] = shard.get(s, 0.0) + p
        shard = _normalise(shard)
    best_cat = max(cat, key=cat.__getitem__)
    best_shard = max(shard, key=shard.__getitem__) if shard else mapping.get(best_cat, "")
    return CategoryPrediction(
        shard=best_shard,
        category=best_cat,
        confidence=cat[best_cat],
        shard_confidence=shard.get(best_shard, 0.0),
        probabilities=dict(sorted(cat.items(), key=lambda kv: -kv[1])),
    )
