"""The feature-event consumer: ``python -m tongkuan.features`` (``catalog.features`` → the local
append-only log, ``feature_store.event_log``, until the feature store replaces it)."""

from __future__ import annotations

import signal

from tongkuan.config import FeaturesConfig, load
from tongkuan.process import serve_metrics, start


def main(argv: list[str] | None = None) -> int:
    from events.kafka import make_consumer, make_producer
    from feature_store.event_log import FeatureEventLog, FeatureLogConsumer

    log = start("tongkuan.features")
    cfg = load(FeaturesConfig)
    s = cfg.features
    serve_metrics(s.metrics_port, s.metrics_addr, log)
    consumer = FeatureLogConsumer(make_consumer([s.topic], s.group_id, cfg.kafka), FeatureEventLog(s.path),
                                  make_producer(cfg.kafka), s)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: consumer.stop())
    log.info("feature events from %s into %s", s.topic, s.path)
    try:
        consumer.run()
    finally:
        consumer.consumer.close()
        consumer.dlq.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
