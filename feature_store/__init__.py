"""Item features for quality re-ranking, on Feast (``README.md`` here; ``docs/feature-store.md``).

Importing the package imports nothing heavy: ``feature_store.features`` (the names the re-ranker
reads) has no Feast import; ``feature_store.store`` (``ItemFeatureStore``) and the aggregator do.
"""
