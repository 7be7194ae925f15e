"""Prometheus metrics of the query side (served on the API's ``/metrics``)."""

from prometheus_client import Counter, Histogram

QUERY_STAGE_SECONDS = Histogram(
    "tongkuan_query_stage_seconds",
    "Query latency per stage (decode, localize, embed, search)",
    ["stage"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
QUERY_ERRORS = Counter("tongkuan_query_errors_total", "Rejected or failed queries by reason", ["reason"])
QUERIES = Counter("tongkuan_queries_total", "Queries served", ["endpoint"])
