"""Ranking metrics of one ranked list (averaged by the callers): NDCG@k, reciprocal rank, Kendall τ.

Gains are taken as given (a label 0..3, or the simulator's hidden quality), linearly:
``DCG = sum(gain_i / log2(i + 2))``. The ideal list is the same gains sorted, unless the caller
passes the gains of everything that could have been shown (``ideal``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def dcg(gains: Sequence[float], k: int) -> float:
    return float(sum(g / math.log2(i + 2) for i, g in enumerate(gains[:k])))


def ndcg_at_k(gains: Sequence[float], k: int = 10, ideal: Sequence[float] | None = None) -> float | None:
    """NDCG@k of ``gains`` in ranked order; None when nothing has a gain (the list is not counted)."""
    best = dcg(sorted(gains if ideal is None else ideal, reverse=True), k)
    return None if best <= 0 else dcg(gains, k) / best


def reciprocal_rank(gains: Sequence[float]) -> float:
    """1 / rank of the first item with a positive gain (0 when none)."""
    for i, g in enumerate(gains):
        if g > 0:
            return 1.0 / (i + 1)
    return 0.0


def kendall_tau(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Kendall's τ-b of two score lists (None under two items, or when either is constant)."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(x) < 2:
        return None
    dx = np.sign(x[:, None] - x[None, :])
    dy = np.sign(y[:, None] - y[None, :])
    iu = np.triu_indices(len(x), 1)
    dx, dy = dx[iu], dy[iu]
    concordant = float(np.sum(dx * dy))
    denom = math.sqrt(float(np.sum(dx != 0)) * float(np.sum(dy != 0)))
    return None if denom == 0 else concordant / denom


def mean(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None
