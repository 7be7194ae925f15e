"""Catalog change events (schema version 1), as carried on Kafka and posted to the upload hook.

Events are keyed by item id (one partition per item keeps per-item order on a healthy broker), and
every event carries the item's monotonic ``version`` so that a late, older event never overwrites a
newer state even when order is lost (retries, replays, a second producer).
Names are past tense: the marketplace says what happened, tongkuan decides what to do.
"""

from __future__ import annotations

import time
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

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
    """Behavioural counters for re-ranking; they go to the feature store, not the vector index."""

    type: Literal["item_features_updated"] = "item_features_updated"
    counters: ItemCounters


CatalogEvent = Annotated[ItemUpserted | ItemDeleted | ItemFeaturesUpdated, Field(discriminator="type")]
_adapter: TypeAdapter[ItemUpserted | ItemDeleted | ItemFeaturesUpdated] = TypeAdapter(CatalogEvent)


def parse_event(data: bytes | str | dict) -> ItemUpserted | ItemDeleted | ItemFeaturesUpdated:
    """Parse and validate one event. Raises ``pydantic.ValidationError`` (or ``ValueError`` for bad
    JSON); callers dead-letter those with the reason."""
    if isinstance(data, dict):
        return _adapter.validate_python(data)
    return _adapter.validate_json(data)


def event_to_bytes(event: ItemUpserted | ItemDeleted | ItemFeaturesUpdated) -> bytes:
    return event.model_dump_json().encode()
