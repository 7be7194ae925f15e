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
NO_MATCH = Counter("tongkuan_query_no_match_total", "Searched products answered no_match (not in the catalog)")
REQUESTS = Counter("tongkuan_api_requests_total", "API requests by route template and status", ["route", "status"])
REQUEST_SECONDS = Histogram("tongkuan_api_request_seconds", "API request latency by route template", ["route"],
                            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0))
# Requests refused before any search work is done (query.access, query.body, the decode slots).
REJECT_REASONS = ("unauthorized", "forbidden", "rate_limited", "slow_body", "busy")
REJECTED = Counter("tongkuan_api_rejected_total", "API requests refused by reason "
                   "(unauthorized, forbidden, rate_limited, slow_body, busy)", ["reason"])
for _reason in REJECT_REASONS:  # exported at 0 from the start, so rate() and alerts see every series
    REJECTED.labels(_reason)
