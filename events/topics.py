"""Kafka topic names, in one place. Every record on these topics is keyed by item id."""

CATALOG_ITEMS = "catalog.items"  # ItemUpserted / ItemDeleted: what the embedding workers apply
CATALOG_FEATURES = "catalog.features"  # ItemFeaturesUpdated: the feature platform's route, never the embedder's
CATALOG_ITEMS_DLQ = "catalog.items.dlq"  # dead letters (events.deadletter envelopes)
ALL_TOPICS = (CATALOG_ITEMS, CATALOG_FEATURES, CATALOG_ITEMS_DLQ)
