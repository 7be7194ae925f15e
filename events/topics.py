"""Kafka topic names, in one place. Every record on the catalog topics is keyed by item id; on
``search.interactions`` by request id (a request's impression and feedback stay in order)."""

CATALOG_ITEMS = "catalog.items"  # ItemUpserted / ItemDeleted: what the embedding workers apply
CATALOG_FEATURES = "catalog.features"  # ItemFeaturesUpdated: the feature platform's route, never the embedder's
CATALOG_ITEMS_DLQ = "catalog.items.dlq"  # dead letters (events.deadletter envelopes)
SEARCH_INTERACTIONS = "search.interactions"  # impressions and feedback (query.interactions) for the feature store
ALL_TOPICS = (CATALOG_ITEMS, CATALOG_FEATURES, CATALOG_ITEMS_DLQ, SEARCH_INTERACTIONS)
