"""tongkuan's composition root: each process's configuration (``config``) and wiring — the API
(``api``), the ingest worker (``worker``), the dispatcher (``dispatcher``), the feature-event
consumer (``features``) — and the command line (``cli``).

The pipeline stages live in the card's top-level packages (events, workers, index, vision, query,
...); this package only wires them together. Tools that do not serve live in ``offline``.
"""

__version__ = "0.1.0"
