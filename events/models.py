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

from events.item import MAX_ID_LEN, CatalogItem

SCHEMA_VERSION = 1


class _Event(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = SCHEMA_VERSION
    item_id: str = Field(min_length=1, max_length=MAX_ID_LEN)
    event_time: float = Field(default_factory=time.time, description="unix seconds at the marketplace")


class ItemUpserted(_Event):
    type: Literal["item_upserted"] = "item_upserted"
    version: int = Field(ge=0)
    title: str = Field(min_length=1, max_length=1000)
    category_path: tuple[str, ...] = Field(min_length=1, max_length=8)
    # Image references: http(s) URL, object-store key or local path (embedded mode). The first is
    # the main image, the one indexed today.
    images: tuple[str, ...] = Field(min_length=1, max_length=16)
    price: float | None = Field(default=None, ge=0)
    shop: str | None = Field(default=None, max_length=256)

    def to_item(self) -> CatalogItem:
        return CatalogItem(
            item_id=self.item_id,
            title=self.title,
            category_path=self.category_path,
            image=self.images[0],
            version=self.version,
            price=self.price,
            shop=self.shop,
        )


class ItemDeleted(_Event):
    type: Literal["item_deleted"] = "item_deleted"
    version: int = Field(ge=0)


class ItemCounters(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    impressions: int = Field(default=0, ge=0)
    clicks: int = Field(default=0, ge=0)
    orders: int = Field(default=0, ge=0)
    sales: float = Field(default=0.0, ge=0)
    rating: float | None = Field(default=None, ge=0, le=5)


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
