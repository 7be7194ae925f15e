"""Shared catalog types and (later) catalog change events.

Everything downstream (workers, index, query) imports item types from here, never the other way round.
"""

from events.item import CatalogItem, ItemFailure

__all__ = ["CatalogItem", "ItemFailure"]
