"""Catalog change events (schema version 1), as carried on Kafka and posted to the upload hook.

Events are keyed by item id (one partition per item keeps per-item order on a healthy broker), and
every state event carries the item's monotonic ``version`` so that a late, older event never
overwrites a newer state even when order is lost (retries, replays, a second producer).
Names are past tense: the marketplace says what happened, tongkuan decides what to do.

Parsing, validation messages and coalescing live in ``events.contract``; this module only defines
the shapes.
"""

from __future__ import annotations

import time
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from events.fields import (
    Amount,
    CategoryPart,
    Count,
    EventTime,
    ImageRef,
    ItemId,
    Price,
    Rating,
    Shop,
    Title,
    Version,
)
from events.item import CatalogItem

SCHEMA_VERSION = 1


class _Event(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = SCHEMA_VERSION
    item_id: ItemId
    event_time: EventTime = Field(default_factory=time.time, description="unix seconds at the marketplace")


class ItemUpserted(_Event):
    type: Literal["item_upserted"] = "item_upserted"
    version: Version
    title: Title
    category_path: tuple[CategoryPart, ...] = Field(min_length=1, max_length=8)
    # Image references: http(s) URL, object-store key or local path (embedded mode). The first is
    # the main image, the one indexed today.
    images: tuple[ImageRef, ...] = Field(min_length=1, max_length=16)
    price: Price | None = None
    shop: Shop | None = None
    stock: Count | None = Field(default=None, description="units on hand; none: not tracked (counts as in stock)")
    product_group: ItemId | None = Field(default=None, description="the marketplace's product (SPU) key, shared "
                                         "by the offers of one product")

    def to_item(self) -> CatalogItem:
        return CatalogItem(
            item_id=self.item_id,
            title=self.title,
            category_path=self.category_path,
            image=self.images[0],
            version=self.version,
            price=self.price,
            shop=self.shop,
            stock=self.stock,
            product_group=self.product_group,
        )


class ItemDeleted(_Event):
    type: Literal["item_deleted"] = "item_deleted"
    version: Version


class ItemCounters(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    impressions: Count = 0
    clicks: Count = 0
    orders: Count = 0
    sales: Amount = 0.0
    rating: Rating | None = None


class ItemFeaturesUpdated(_Event):
    """Behavioural counters for re-ranking: they travel on ``catalog.features`` to the feature
    platform, never to the embedding workers."""

    type: Literal["item_features_updated"] = "item_features_updated"
    counters: ItemCounters


StateEvent = ItemUpserted | ItemDeleted
CatalogEvent = ItemUpserted | ItemDeleted | ItemFeaturesUpdated
AnyEvent = Annotated[CatalogEvent, Field(discriminator="type")]


def event_to_bytes(event: CatalogEvent) -> bytes:
    return event.model_dump_json().encode()
