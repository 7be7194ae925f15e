"""What every long-running process does when it starts: log lines with a timestamp, ``/metrics``."""

from __future__ import annotations

import logging


def start(name: str) -> logging.Logger:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return logging.getLogger(name)


def serve_metrics(port: int, addr: str, log: logging.Logger) -> None:
    """Prometheus ``/metrics`` on ``addr:port`` from a daemon thread (0: off)."""
    if not port:
        return
    from prometheus_client import start_http_server

    start_http_server(port, addr=addr)
    log.info("metrics on http://%s:%d/metrics", addr, port)
