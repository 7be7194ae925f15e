"""Helpers of the re-ranker's tests."""

from __future__ import annotations

from index.base import SearchHit as IndexHit


def hit(item_id: str, score: float, **payload) -> IndexHit:
    """A visual candidate as the index returns it (payload: item_id and the given keys)."""
    return IndexHit(item_id, "Fruit", score, {"item_id": item_id, **payload})
