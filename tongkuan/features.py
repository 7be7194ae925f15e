"""The feature-store consumer: ``python -m tongkuan.features`` (``catalog.features``,
``search.interactions`` and ``catalog.items`` → ``feature_store.aggregator`` → Feast; refused records
are dead-lettered with their reason, offsets committed after each batch's pushes)."""

from __future__ import annotations

import signal

from tongkuan.config import FeaturesConfig, load
from tongkuan.process import serve_metrics, start


def main(argv: list[str] | None = None) -> int:
    from events.kafka import make_consumer, make_producer
    from feature_store.aggregator import ItemFeatureAggregator
    from feature_store.consumer import FeatureStoreConsumer
    from feature_store.store import ItemFeatureStore

    log = start("tongkuan.features")
    cfg = load(FeaturesConfig)
    s = cfg.features
    serve_metrics(s.metrics_port, s.metrics_addr, log)
    store = ItemFeatureStore(cfg.feature_store)
    store.apply()  # idempotent: the views and the online tables exist before the first push or read
    aggregator = ItemFeatureAggregator(store, cfg.aggregator)
    consumer = FeatureStoreConsumer(make_consumer(s.topics, s.group_id, cfg.kafka), aggregator,
                                    make_producer(cfg.kafka), s)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: consumer.stop())
    log.info("feature events from %s into the feature store (%s online)", ", ".join(s.topics),
             cfg.feature_store.online.type)
    try:
        consumer.run()
    finally:
        consumer.consumer.close()
        consumer.dlq.close()
        aggregator.close()
        store.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
