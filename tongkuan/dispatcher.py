"""The dispatcher process: ``python -m tongkuan.dispatcher`` (``catalog.items`` → Celery tasks).

Reads ``tongkuan.config.DispatcherConfig`` at start, serves ``/metrics``, stops on SIGTERM after
its in-flight batches (``TONGKUAN_DISPATCHER__SHUTDOWN_GRACE_S``).
"""

from __future__ import annotations

from tongkuan.config import DispatcherConfig, load
from tongkuan.process import serve_metrics, start


def main(argv: list[str] | None = None) -> int:
    from events.kafka import make_consumer, make_producer
    from workers.celery_app import celery_config, create_app
    from workers.dispatcher import Dispatcher
    from workers.task_queue import CelerySender

    log = start("tongkuan.dispatcher")
    cfg = load(DispatcherConfig)
    s = cfg.dispatcher
    serve_metrics(s.metrics_port, s.metrics_addr, log)
    app = create_app(celery_config(cfg.celery), tasks=False)
    dispatcher = Dispatcher(make_consumer([s.topic], s.group_id, cfg.kafka), CelerySender(app),
                            make_producer(cfg.kafka), s)
    dispatcher.install_signal_handlers()
    log.info("dispatcher consuming %s as group %s", s.topic, s.group_id)
    try:
        dispatcher.run()
    finally:
        dispatcher.consumer.close()
        dispatcher.producer.close()
        log.info("dispatcher stopped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
