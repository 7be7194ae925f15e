"""``LightGBMReranker``: the ``query.searcher.Reranker`` of the quality re-ranker.

Per request: one ``FeatureReader.online`` call for the candidates, one LightGBM ``predict`` on a
(n, features) float32 matrix with one thread (60 candidates: see ``offline/simulate/bench.py`` for
the latency), then ``groups.arrange``: the best visual product stays first, offers are ordered
within their product group, groups below the first move only inside a visual near-tie.

It answers in visual order, and says so, when it cannot do better: no active model
(``no_model``), the feature store failed or knew none of the candidates (``features_unavailable``),
the model failed to score (``error``). Each counts in ``tongkuan_rerank_fallbacks_total{reason}``
and the result's ``ranker`` is ``"visual-fallback"``; otherwise it is ``"lightgbm:<version>"``.
A single missing value, or an item the store does not know yet, is NaN for the model, not a
fallback.

Models come from a ``ModelRegistry``. ``activate(version)`` loads and checks a version (its files,
and that its feature list is the one this process computes) before it swaps it in; a refused
version raises ``ModelRejected`` and the model that was serving keeps serving.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import lightgbm as lgb
import numpy as np

from index.base import SearchHit as IndexHit
from rerank.features import FeatureReader, candidate_matrix, category_vote, feature_names
from rerank.groups import arrange
from rerank.metrics import FALLBACKS
from rerank.registry import ModelManifest, ModelRegistry, ModelRejected

log = logging.getLogger(__name__)

FALLBACK = "visual-fallback"


@dataclass(frozen=True)
class RerankResult:
    hits: list[IndexHit]
    ranker: str                      # "lightgbm:<version>" or "visual-fallback"
    fallback_reason: str | None      # no_model, features_unavailable, error; None when the model ranked
    scores: list[float] | None       # the model's raw score per returned hit (None on a fallback)


@dataclass(frozen=True)
class Explanation:
    item_id: str
    score: float                     # the model's raw score
    bias: float                      # the model's expected value (the same for every item)
    contributions: dict[str, float]  # feature -> SHAP contribution; bias + sum == score


@dataclass(frozen=True)
class _Model:
    booster: lgb.Booster
    manifest: ModelManifest

    @property
    def name(self) -> str:
        return f"lightgbm:{self.manifest.version}"


class LightGBMReranker:
    def __init__(
        self,
        reader: FeatureReader | None,
        *,
        store_features: Sequence[str],
        registry: ModelRegistry | None = None,
        tie_margin: float = 0.02,
        min_feature_coverage: float = 0.0,
    ):
        """``store_features``: the feature store's names this process reads (with the request
        features, they must be the model's list). ``tie_margin``: visual-score difference under
        which two products below the first may trade places (``groups.arrange``; 0: never).
        ``min_feature_coverage``: fall back when the store knows fewer of the candidates than this
        share (it always falls back when it knows none). The registry's active version, if any, is
        loaded; a refused one is logged and leaves the re-ranker without a model (visual order)."""
        self.reader = reader
        self.store_features = list(store_features)
        self.feature_names = feature_names(self.store_features)
        self.registry = registry
        self.tie_margin = tie_margin
        self.min_feature_coverage = min_feature_coverage
        self._model: _Model | None = None
        self._lock = threading.Lock()
        self._local = threading.local()
        if registry is not None:
            active = registry.active_version()
            if active is not None:
                try:
                    self._swap_in(active)
                except ModelRejected as e:
                    log.error("the active re-ranking model cannot serve, visual order until one is activated: %s", e)

    # -- models ----------------------------------------------------------------------------------
    @property
    def active_version(self) -> str | None:
        m = self._model
        return None if m is None else m.manifest.version

    @property
    def name(self) -> str:
        """The ranker of this thread's last ``rerank`` (what ``Searcher`` puts in the response's
        ``ranker``); before any, the active model's name or ``visual-fallback``."""
        last = getattr(self._local, "ranker", None)
        if last is not None:
            return last
        m = self._model
        return FALLBACK if m is None else m.name

    def activate(self, version: str) -> ModelManifest:
        """Serve ``version`` from now on and make it the registry's active one; ``ModelRejected``
        (and the previous model still serving) when it is corrupt or incompatible."""
        if self.registry is None:
            raise ModelRejected(version, "missing", "this re-ranker has no model registry")
        manifest = self._swap_in(version)
        self.registry.set_active(version)
        return manifest

    def refresh(self) -> bool:
        """Follow the registry's ``ACTIVE`` pointer (another process activated a version): True when
        a new version now serves. A refused one is logged; the current model keeps serving."""
        if self.registry is None:
            return False
        active = self.registry.active_version()
        if active is None or active == self.active_version:
            return False
        try:
            self._swap_in(active)
        except ModelRejected as e:
            log.error("the registry's active model cannot serve, keeping %s: %s", self.active_version, e)
            return False
        return True

    def _swap_in(self, version: str) -> ModelManifest:
        if self.registry is None:
            raise ModelRejected(version, "missing", "this re-ranker has no model registry")
        booster, manifest = self.registry.load(version)
        if manifest.feature_names != self.feature_names:
            raise ModelRejected(version, "incompatible", f"the model's features {manifest.feature_names} are "
                                f"not this re-ranker's {self.feature_names}")
        try:  # a model that loads but cannot score a row must not reach a request
            probe = booster.predict(np.full((2, len(self.feature_names)), np.nan, dtype=np.float32),
                                    raw_score=True, num_threads=1)
        except lgb.basic.LightGBMError as e:
            raise ModelRejected(version, "corrupt", f"the model cannot score: {e}") from e
        if probe.shape != (2,) or not np.all(np.isfinite(probe)):
            raise ModelRejected(version, "corrupt", f"the model scores a probe row as {probe!r}")
        with self._lock:
            self._model = _Model(booster, manifest)
        log.info("re-ranking model %s serving (%d features)", version, len(self.feature_names))
        return manifest

    # -- serving ---------------------------------------------------------------------------------
    def rerank(self, hits: list[IndexHit], *, category: str | None = None) -> list[IndexHit]:
        """``Reranker.rerank``: the candidates in served order. ``category``: the searcher's
        predicted coarse category (None: the candidates' own vote, ``features.category_vote``)."""
        return self.rerank_with_info(hits, category=category).hits

    def rerank_with_info(self, hits: Sequence[IndexHit], *, category: str | None = None) -> RerankResult:
        hits = list(hits)
        model = self._model
        if model is None:
            return self._fallback(hits, "no_model")
        if category is None:
            category = category_vote(hits)
        try:
            cm = candidate_matrix(hits, category, self.reader, self.store_features)
        except Exception as e:  # the store is another system: any failure of it is a fallback
            log.warning("feature read failed, visual order: %s", e)
            return self._fallback(hits, "features_unavailable")
        if hits and self.store_features and (cm.coverage == 0 or cm.coverage < self.min_feature_coverage):
            return self._fallback(hits, "features_unavailable")
        try:
            scores = model.booster.predict(cm.X, raw_score=True, num_threads=1) if hits else np.zeros(0)
        except Exception as e:
            log.exception("re-ranking model %s failed to score, visual order: %s", model.manifest.version, e)
            return self._fallback(hits, "error")
        visual = cm.X[:, 0].tolist()
        order = arrange(cm.groups, visual, scores.tolist(), tie_margin=self.tie_margin)
        self._local.ranker = model.name
        return RerankResult([hits[i] for i in order], model.name, None, [float(scores[i]) for i in order])

    def _fallback(self, hits: list[IndexHit], reason: str) -> RerankResult:
        FALLBACKS.labels(reason).inc()
        self._local.ranker = FALLBACK
        return RerankResult(hits, FALLBACK, reason, None)

    # -- explaining ------------------------------------------------------------------------------
    def explain(self, hits: Sequence[IndexHit], *, category: str | None = None) -> list[Explanation]:
        """Per-feature contributions (``pred_contrib=True``, TreeSHAP) of each candidate's score, in
        the order of ``hits``. Raises ``LookupError`` without an active model."""
        model = self._model
        if model is None:
            raise LookupError("no active re-ranking model")
        hits = list(hits)
        if category is None:
            category = category_vote(hits)
        cm = candidate_matrix(hits, category, self.reader, self.store_features)
        scores = model.booster.predict(cm.X, raw_score=True, num_threads=1)
        contrib = np.asarray(model.booster.predict(cm.X, pred_contrib=True, num_threads=1))
        out = []
        for h, score, row in zip(hits, scores, contrib, strict=True):
            parts = {n: float(v) for n, v in zip(self.feature_names, row[:-1], strict=True)}
            out.append(Explanation(h.item_id, float(score), float(row[-1]), parts))
        return out
