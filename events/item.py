"""The catalog item: what a marketplace sells, as tongkuan indexes it."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from events.fields import MAX_ID_LEN, CategoryPart, Count, ImageRef, ItemId, Price, Shop, Title, Version

__all__ = ["MAX_ID_LEN", "CatalogItem", "ItemFailure"]


class CatalogItem(BaseModel):
    """One sellable item with one main image (the value types: ``events.fields``).

    ``category_path`` runs from the top-level category (the index shard key) down to the leaf,
    e.g. ``["Fruit", "Apple", "Granny-Smith"]``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    item_id: ItemId
    title: Title
    category_path: tuple[CategoryPart, ...] = Field(min_length=1, max_length=8)
    image: ImageRef = Field(description="object key, local path (embedded mode) or http(s) URL")
    version: Version = Field(default=0, description="monotonic per item; a lower version never overwrites")
    price: Price | None = None
    shop: Shop | None = None
    stock: Count | None = Field(default=None, description="units on hand; none: not tracked (counts as in stock)")
    product_group: ItemId | None = Field(default=None, description="the marketplace's product (SPU) key: offers "
                                         "sharing it are one product to the re-ranker (rerank.groups)")

    @property
    def in_stock(self) -> bool:
        return self.stock is None or self.stock > 0

    @property
    def shard(self) -> str:
        """Top-level category: the index shard this item lives in."""
        return self.category_path[0]

    @property
    def coarse_category(self) -> str:
        """Second level if present (e.g. 'Apple'), else the top level."""
        return self.category_path[1] if len(self.category_path) > 1 else self.category_path[0]


class ItemFailure(BaseModel):
    """Why one item (or catalog row) was not indexed. ``reason`` is a stable machine-readable code."""

    item_id: str
    reason: str
    detail: str = ""
