"""The catalog item: what a marketplace sells, as tongkuan indexes it."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_ID_LEN = 256


class CatalogItem(BaseModel):
    """One sellable item with one main image.

    ``category_path`` runs from the top-level category (the index shard key) down to the leaf,
    e.g. ``["Fruit", "Apple", "Granny-Smith"]``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    item_id: str = Field(min_length=1, max_length=MAX_ID_LEN)
    title: str = Field(min_length=1, max_length=1000)
    category_path: tuple[str, ...] = Field(min_length=1, max_length=8)
    image: str = Field(min_length=1, max_length=4096, description="local path, object key or http(s) URL")
    version: int = Field(default=0, ge=0, description="monotonic per item; a lower version never overwrites")
    price: float | None = Field(default=None, ge=0)
    shop: str | None = Field(default=None, max_length=256)

    @field_validator("item_id", "title")
    @classmethod
    def _strip(cls, v: str) -> str:
        v = v.strip()
        if not v:
            raise ValueError("must not be blank")
        return v

    @field_validator("category_path")
    @classmethod
    def _non_blank_parts(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        parts = tuple(p.strip() for p in v)
        if any(not p for p in parts):
            raise ValueError("category path parts must not be blank")
        return parts

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
