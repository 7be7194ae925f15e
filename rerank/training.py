"""Training the re-ranker from logged impressions and feedback.

The table (a pandas DataFrame) has one row per impression: ``request_id``, ``request_time`` (epoch
seconds), ``item_id``, ``position`` (0-based, where it was shown), ``group`` (its product group in
that request, ``CandidateMatrix.groups``), ``label`` (0 none, 1 click, 2 add-to-cart, 3 order) and
every feature column (``feature_names(store_features)``), logged as they were computed when the
list was served. Logging the served features, rather than joining today's feature values to
yesterday's impressions, is what keeps future clicks out of the training features.

* **LambdaRank** (``objective=lambdarank``), one query group per request.
* **Position-bias correction**: ``lgb.Dataset(..., position=...)``. LightGBM 4.x then learns one
  bias factor per position jointly with the model (unbiased LambdaMART, Hu et al., WWW 2019), so a
  click at position 0 counts for less than one at position 7: the model learns what shoppers
  prefer, not what the previous ranker showed first.
* **Monotone constraints**: +1 on the visual score, -1 on its gap and rank (``features.MONOTONE``).
* **Time-based holdout**: the last ``holdout_fraction`` of the requests by request time are held
  out; NDCG@10 and MRR of the served order (``groups.arrange`` of the model's scores, the rule the
  re-ranker serves) against the visual order are measured there, on the logged labels and, where
  the table has one (the simulator's hidden quality), on a truth column.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import lightgbm as lgb
import numpy as np
import pandas as pd

from rerank.features import feature_names, monotone_constraints
from rerank.groups import arrange
from rerank.ranking_metrics import mean, ndcg_at_k, reciprocal_rank
from rerank.registry import ModelManifest, ModelRegistry

KEY_COLUMNS = ("request_id", "request_time", "item_id", "position", "group", "label")

DEFAULT_PARAMS: dict[str, Any] = {
    "objective": "lambdarank",
    "metric": "ndcg",
    "eval_at": [10],
    # Small, strongly regularised trees: a day of a few hundred searches has a few hundred clicks.
    # Chosen on the simulated loop (docs/rerank.md: leaves 15 -> 7, min_data_in_leaf 40 -> 100,
    # lambda_l2 0 -> 50 took day-1..3 NDCG@10 over visual from -0.01..+0.02 to +0.02..+0.06).
    "learning_rate": 0.05,
    "num_leaves": 7,
    "min_data_in_leaf": 100,
    "lambda_l2": 50.0,
    "feature_fraction": 0.9,
    "lambdarank_truncation_level": 20,
    "monotone_constraints_method": "intermediate",
    "num_threads": 2,
    "deterministic": True,
    "force_row_wise": True,
    "seed": 0,
    "verbosity": -1,
}
DEFAULT_ROUNDS = 200


class TrainingDataError(ValueError):
    pass


@dataclass(frozen=True)
class TrainResult:
    booster: lgb.Booster
    feature_names: list[str]
    store_features: list[str]
    metrics: dict[str, Any]
    data_window: dict[str, Any]
    params: dict[str, Any]

    def publish(self, registry: ModelRegistry) -> ModelManifest:
        """Save as the registry's next version (not activated)."""
        return registry.save(self.booster.model_to_string(), feature_names=self.feature_names,
                             store_features=self.store_features, data_window=self.data_window,
                             metrics=self.metrics, params=self.params)


def split_by_time(table: pd.DataFrame, holdout_fraction: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, holdout): the last ``holdout_fraction`` of the requests by request time are held out
    (every row of a request on the same side)."""
    if not 0 <= holdout_fraction < 1:
        raise ValueError("holdout_fraction must be in [0, 1)")
    times = table.groupby("request_id", sort=False)["request_time"].min().sort_values(kind="stable")
    n_hold = int(round(len(times) * holdout_fraction))
    held = set(times.index[len(times) - n_hold:]) if n_hold else set()
    mask = table["request_id"].isin(held)
    return table[~mask], table[mask]


def train(
    table: pd.DataFrame,
    store_features: Sequence[str],
    *,
    holdout_fraction: float = 0.2,
    params: Mapping[str, Any] | None = None,
    num_rounds: int = DEFAULT_ROUNDS,
    use_position: bool = True,
    truth_column: str | None = None,
    tie_margin: float = 0.0,
) -> TrainResult:
    """Fit LambdaRank on the table's older requests and evaluate it on the newest (module doc)."""
    names = feature_names(store_features)
    missing = [c for c in (*KEY_COLUMNS, *names) if c not in table.columns]
    if missing:
        raise TrainingDataError(f"the impression table lacks columns {missing}")
    if truth_column is not None and truth_column not in table.columns:
        raise TrainingDataError(f"no truth column {truth_column!r}")
    table = _ordered(table)
    fit, hold = split_by_time(table, holdout_fraction)
    if fit.empty:
        raise TrainingDataError("no requests left to train on")
    if not (fit["label"] > 0).any():
        raise TrainingDataError("no positive labels (clicks, carts, orders) in the training window")
    p = {**DEFAULT_PARAMS, **(params or {})}
    p["monotone_constraints"] = monotone_constraints(names)
    dataset = lgb.Dataset(
        fit[names].to_numpy(np.float32), label=fit["label"].to_numpy(np.int32),
        group=_group_sizes(fit), feature_name=names,
        position=fit["position"].to_numpy(np.int32) if use_position else None,
        params={"verbosity": -1}, free_raw_data=False,
    )
    booster = lgb.train(p, dataset, num_boost_round=num_rounds)
    metrics: dict[str, Any] = {
        "train": {"requests": int(fit["request_id"].nunique()), "rows": len(fit)},
        "holdout": {"requests": int(hold["request_id"].nunique()), "rows": len(hold)},
        "position_bias_correction": use_position,
    }
    if not hold.empty:
        metrics["holdout"]["label"] = evaluate(booster, hold, names, gain_column="label", tie_margin=tie_margin)
        if truth_column is not None:
            metrics["holdout"]["truth"] = evaluate(booster, hold, names, gain_column=truth_column,
                                                   tie_margin=tie_margin)
    window = {
        "from": _iso(float(table["request_time"].min())), "to": _iso(float(table["request_time"].max())),
        "holdout_from": _iso(float(hold["request_time"].min())) if not hold.empty else None,
        "requests": int(table["request_id"].nunique()), "rows": len(table),
    }
    kept = {k: v for k, v in p.items() if k != "monotone_constraints"}
    kept.update(num_rounds=num_rounds, monotone=dict(zip(names, p["monotone_constraints"], strict=True)))
    return TrainResult(booster, names, list(store_features), metrics, window, kept)


def evaluate(
    booster: lgb.Booster, table: pd.DataFrame, names: Sequence[str], *, gain_column: str = "label",
    k: int = 10, tie_margin: float = 0.0,
) -> dict[str, dict[str, float | None]]:
    """NDCG@k and MRR of the visual order vs the served order (``arrange``) over the requests of
    ``table``; a request without any gain is left out of NDCG (it cannot be ordered better)."""
    table = _ordered(table)
    scores = booster.predict(table[names].to_numpy(np.float32), raw_score=True, num_threads=1)
    nd_v, nd_r, rr_v, rr_r = [], [], [], []
    start = 0
    for size in _group_sizes(table):
        rows = table.iloc[start:start + size]
        s = scores[start:start + size]
        start += size
        gains = rows[gain_column].to_numpy(float)
        visual = np.argsort(rows["visual_rank"].to_numpy(float), kind="stable")
        served = arrange(rows["group"].tolist(), rows["visual_score"].tolist(), s.tolist(), tie_margin=tie_margin)
        nd_v.append(ndcg_at_k(gains[visual].tolist(), k))
        nd_r.append(ndcg_at_k(gains[served].tolist(), k))
        rr_v.append(reciprocal_rank(gains[visual].tolist()))
        rr_r.append(reciprocal_rank(gains[served].tolist()))
    return {f"ndcg@{k}": {"visual": mean(nd_v), "ranker": mean(nd_r)},
            "mrr": {"visual": mean(rr_v), "ranker": mean(rr_r)}}


def _ordered(table: pd.DataFrame) -> pd.DataFrame:
    """Rows of a request together (LightGBM's query groups are runs of rows), requests by time."""
    return table.sort_values(["request_time", "request_id", "position"], kind="stable").reset_index(drop=True)


def _group_sizes(table: pd.DataFrame) -> np.ndarray:
    ids = table["request_id"].to_numpy()
    if len(ids) == 0:
        return np.zeros(0, dtype=np.int64)
    change = np.flatnonzero(ids[1:] != ids[:-1]) + 1
    bounds = np.concatenate([[0], change, [len(ids)]])
    return np.diff(bounds)


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds")
