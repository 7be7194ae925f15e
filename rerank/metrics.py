"""Prometheus metrics of the re-ranker (served on the API's ``/metrics`` with the query side's)."""

from prometheus_client import Counter

FALLBACKS = Counter(
    "tongkuan_rerank_fallbacks",
    "Re-rank requests answered in visual order, by reason: no_model (none active), "
    "features_unavailable (the feature store failed or knew none of the candidates), error (the "
    "model failed to score)",
    ["reason"],
)
FALLBACK_REASONS = ("no_model", "features_unavailable", "error")
for _reason in FALLBACK_REASONS:  # exported at 0 from the start, so rate() and alerts see every series
    FALLBACKS.labels(_reason)
