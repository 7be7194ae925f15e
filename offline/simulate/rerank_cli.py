"""``python -m offline bench-rerank``: ``python -m offline.simulate bench`` under the offline tools'
name (the benchmark itself is ``offline.simulate.bench``; the CLI is ``offline.simulate.__main__``)."""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    from offline.simulate.__main__ import main as simulate_main

    return simulate_main(["bench", *(argv or [])])
