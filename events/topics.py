"""Kafka topic names, in one place. Every record on these topics is keyed by item id."""

CATALOG_ITEMS = "catalog.items"  # ItemUpserted / ItemDeleted / ItemFeaturesUpdated
CATALOG_ITEMS_DLQ = "catalog.items.dlq"  # dead letters: the original record plus a reason
ALL_TOPICS = (CATALOG_ITEMS, CATALOG_ITEMS_DLQ)
