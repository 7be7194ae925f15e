"""A SIMULATED visual search: cosine-like scores drawn per query, no images looked at.

Per query, each product gets a score: the photographed product N(0.80, 0.05), another product of
the same coarse category N(0.66, 0.07), of the same top-level category N(0.55, 0.08), any other
N(0.45, 0.08). Each offer then scores its product's score + N(0, 0.003) when it shows the
product's own image (twins score alike, as near duplicates do), or minus U(0.02, 0.10) + N(0, 0.02)
when it shows another photo of the product. Nothing in the scores depends on an offer's quality:
that is what the visual search cannot see. The top ``candidate_k`` are returned as
``index.base.SearchHit`` with the offer's payload, best first, like ``VectorIndex.search``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from index.base import SearchHit as IndexHit
from offline.simulate.catalog import SimOffer
from offline.simulate.shoppers import SimQuery, query_rng


@dataclass(frozen=True)
class VisualScores:
    right: tuple[float, float] = (0.80, 0.05)
    same_category: tuple[float, float] = (0.66, 0.07)
    same_top: tuple[float, float] = (0.55, 0.08)
    other: tuple[float, float] = (0.45, 0.08)
    twin_sd: float = 0.003
    own_photo_drop: tuple[float, float] = (0.02, 0.10)
    own_photo_sd: float = 0.02


class SimulatedVisualSearch:
    def __init__(self, offers: Sequence[SimOffer], *, seed: int = 0, candidate_k: int = 60,
                 scores: VisualScores | None = None):
        self.offers = list(offers)
        self.seed = seed
        self.candidate_k = candidate_k
        self.scores = scores or VisualScores()
        self._payloads = [o.payload() for o in self.offers]
        self._products = sorted({o.product_id for o in self.offers})
        self._pindex = {p: i for i, p in enumerate(self._products)}
        first = {}
        for o in self.offers:
            first.setdefault(o.product_id, o)
        self._pcat = [first[p].category for p in self._products]
        self._ptop = [first[p].top for p in self._products]
        self._offer_product = np.array([self._pindex[o.product_id] for o in self.offers])
        own = {o.product_id: o.image for o in self.offers if o.item_id.endswith("#o0")}
        self._own_image = np.array([o.image == own.get(o.product_id, o.image) for o in self.offers])

    def __call__(self, query: SimQuery) -> list[IndexHit]:
        rng = query_rng(self.seed, query.request_id, salt=2)
        s = self.scores
        right = self._pindex[query.product_id]
        cat, top = self._pcat[right], self._ptop[right]
        n = len(self._products)
        mean = np.empty(n)
        sd = np.empty(n)
        for i in range(n):
            if i == right:
                mean[i], sd[i] = s.right
            elif self._pcat[i] == cat:
                mean[i], sd[i] = s.same_category
            elif self._ptop[i] == top:
                mean[i], sd[i] = s.same_top
            else:
                mean[i], sd[i] = s.other
        product_score = rng.normal(mean, sd)
        m = len(self.offers)
        base = product_score[self._offer_product]
        twin = base + rng.normal(0.0, s.twin_sd, m)
        photo = base - rng.uniform(*s.own_photo_drop, m) + rng.normal(0.0, s.own_photo_sd, m)
        score = np.clip(np.where(self._own_image, twin, photo), -1.0, 1.0)
        top_k = np.argsort(-score, kind="stable")[: self.candidate_k]
        return [IndexHit(self.offers[i].item_id, self.offers[i].top, float(score[i]), self._payloads[i]) for i in top_k]
