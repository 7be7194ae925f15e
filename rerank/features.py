"""What the re-ranker knows about each visual candidate: features of the request (computed from the
candidate list itself) and features of the item (read from the feature store).

``FeatureReader`` is the one interface to the feature store: ``online(item_ids)`` returns, per item
id it knows, a mapping of feature name to value (``None`` for a value it does not have). Any object
with that method satisfies it (the Feast-backed store of ``feature_store/``, ``InMemoryFeatureReader``
here). An unknown item or a ``None`` value becomes NaN, which LightGBM routes down the branch it
learnt for missing values.

The request features (``CONTEXT_FEATURES``) are computed identically at serving and when
impressions are logged for training (``candidate_matrix``), so the model never sees a feature that
was computed one way in training and another way online.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from index.base import SearchHit as IndexHit
from rerank.groups import product_groups

# Order matters: it is the model's column order (recorded in the manifest, checked at activation).
CONTEXT_FEATURES: tuple[str, ...] = (
    "visual_score",      # cosine similarity of the candidate to the query
    "visual_rank",       # 0-based rank in the visual order
    "visual_gap",        # best visual score of the list minus this one
    "category_match",    # 1 when the candidate's coarse category is the predicted one (NaN: unknown)
    "group_size",        # candidates of the same product group (twins + product-group key)
    "in_best_group",     # 1 when in the group of the best visual candidate
    "near_duplicate",    # 1 when the candidate is a twin (``duplicate_of``) of an earlier item
    "group_visual_gap",  # best visual score of its group minus this one
    "price_rel_group",   # price / cheapest price in its group (NaN: no price)
)
# Monotone constraints (+1: the score may only rise with the feature; -1: only fall). A closer
# visual match must never cost a candidate its place: the model may not learn from position-biased
# clicks that a weaker visual match is better.
MONOTONE: Mapping[str, int] = {"visual_score": 1, "visual_gap": -1, "visual_rank": -1}


@runtime_checkable
class FeatureReader(Protocol):
    """Online item features: ``{item_id: {feature_name: value or None}}`` for the ids it knows."""

    def online(self, item_ids: Sequence[str]) -> Mapping[str, Mapping[str, float | None]]: ...


class InMemoryFeatureReader:
    """A dict-backed ``FeatureReader`` (tests, the simulator, the benchmark). ``put`` merges values."""

    def __init__(self, rows: Mapping[str, Mapping[str, float | None]] | None = None):
        self._rows: dict[str, dict[str, float | None]] = {k: dict(v) for k, v in (rows or {}).items()}

    def put(self, item_id: str, values: Mapping[str, float | None]) -> None:
        self._rows.setdefault(item_id, {}).update(values)

    def online(self, item_ids: Sequence[str]) -> dict[str, dict[str, float | None]]:
        rows = self._rows
        return {i: rows[i] for i in item_ids if i in rows}


def feature_names(store_features: Sequence[str]) -> list[str]:
    """The model's columns: the request features, then the store's (in the given order)."""
    clash = set(CONTEXT_FEATURES) & set(store_features)
    if clash:
        raise ValueError(f"store features {sorted(clash)} clash with request features of the same name")
    if len(set(store_features)) != len(store_features):
        raise ValueError(f"duplicate store feature names in {list(store_features)}")
    return [*CONTEXT_FEATURES, *store_features]


def monotone_constraints(names: Sequence[str]) -> list[int]:
    return [MONOTONE.get(n, 0) for n in names]


@dataclass(frozen=True)
class CandidateMatrix:
    """Features of one request's candidates, in the hits' order."""

    X: np.ndarray          # float32, (n, len(names))
    groups: list[int]      # product group per candidate: 0 is the best visual candidate's group
    coverage: float        # share of candidates the feature store knew (1.0 without store features)


def context_features(hits: Sequence[IndexHit], category: str | None) -> tuple[np.ndarray, list[int]]:
    """(n, len(CONTEXT_FEATURES)) float32 and the group of each candidate. ``hits`` in visual order
    (best first, as the index returns them); ``category``: the predicted coarse category."""
    n = len(hits)
    out = np.full((n, len(CONTEXT_FEATURES)), np.nan, dtype=np.float32)
    if n == 0:
        return out, []
    groups = product_groups(hits)
    scores = [float(h.score) for h in hits]
    best = max(scores)
    size: dict[int, int] = {}
    gbest: dict[int, float] = {}
    cheapest: dict[int, float] = {}
    prices: list[float] = []
    for g, s, h in zip(groups, scores, hits, strict=True):
        size[g] = size.get(g, 0) + 1
        gbest[g] = max(gbest.get(g, -math.inf), s)
        p = _number(h.payload.get("price"))
        prices.append(p)
        if p == p and p > 0:  # not NaN
            cheapest[g] = min(cheapest.get(g, math.inf), p)
    best_group = groups[scores.index(best)]
    for i, (g, s, h) in enumerate(zip(groups, scores, hits, strict=True)):
        cat = h.payload.get("category")
        row = out[i]
        row[0] = s
        row[1] = i
        row[2] = best - s
        row[3] = np.nan if category is None or cat is None else float(str(cat) == category)
        row[4] = size[g]
        row[5] = float(g == best_group)
        row[6] = float(bool(h.payload.get("duplicate_of")))
        row[7] = gbest[g] - s
        row[8] = prices[i] / cheapest[g] if g in cheapest and prices[i] == prices[i] else np.nan
    return out, groups


def candidate_matrix(
    hits: Sequence[IndexHit],
    category: str | None,
    reader: FeatureReader | None,
    store_features: Sequence[str],
) -> CandidateMatrix:
    """Request features + the store's features of ``hits`` (one ``reader.online`` call). A reader
    error propagates: the caller decides (the re-ranker falls back to visual order)."""
    ctx, groups = context_features(hits, category)
    if not store_features:
        return CandidateMatrix(ctx, groups, 1.0)
    n = len(hits)
    rows = reader.online([h.item_id for h in hits]) if reader is not None and n else {}
    nan = math.nan
    unknown = [nan] * len(store_features)
    values = []
    known = 0
    for h in hits:
        row = rows.get(h.item_id)
        if row is None:
            values.append(unknown)
            continue
        known += 1
        values.append([nan if (v := row.get(name)) is None else v for name in store_features])
    store = np.asarray(values, dtype=np.float32).reshape(n, len(store_features))
    return CandidateMatrix(np.hstack([ctx, store]), groups, known / n if n else 1.0)


def category_vote(hits: Sequence[IndexHit], *, k: int = 25, temperature: float = 0.05) -> str | None:
    """The coarse category the candidates vote for (each of the top ``k`` adds
    ``exp((score - best) / temperature)``), for a caller that does not pass the searcher's
    prediction. It is ``query.category.knn_vote`` without the classifier; rerank/ may not import
    query/ (imports go down only), so the dozen lines are repeated here."""
    if not hits:
        return None
    top = float(hits[0].score)
    votes: dict[str, float] = {}
    for h in hits[:k]:
        c = h.payload.get("category")
        if c is None:
            continue
        votes[str(c)] = votes.get(str(c), 0.0) + math.exp((float(h.score) - top) / temperature)
    return max(votes, key=votes.__getitem__) if votes else None


def _number(v: object) -> float:
    if isinstance(v, bool) or v is None:
        return math.nan
    try:
        return float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan
