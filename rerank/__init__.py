"""The quality re-ranker: LightGBM LambdaRank over the visual candidates (``query.searcher.Reranker``).

Serving imports only ``rerank.reranker`` (lightgbm, numpy, prometheus_client); ``rerank.training``
also needs pandas. See ``rerank/README.md``.
"""

from rerank.features import (
    CONTEXT_FEATURES,
    CandidateMatrix,
    FeatureReader,
    InMemoryFeatureReader,
    candidate_matrix,
    feature_names,
)
from rerank.groups import PRODUCT_GROUP_KEY, arrange, product_groups
from rerank.registry import ModelManifest, ModelRegistry, ModelRejected
from rerank.reranker import FALLBACK, Explanation, LightGBMReranker, RerankResult

__all__ = [
    "CONTEXT_FEATURES",
    "FALLBACK",
    "PRODUCT_GROUP_KEY",
    "CandidateMatrix",
    "Explanation",
    "FeatureReader",
    "InMemoryFeatureReader",
    "LightGBMReranker",
    "ModelManifest",
    "ModelRegistry",
    "ModelRejected",
    "RerankResult",
    "arrange",
    "candidate_matrix",
    "feature_names",
    "product_groups",
]
