"""Request/response families of the query side (shared by the in-process API, CLI and HTTP)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_LIMIT = 100
MAX_OBJECTS = 5
MAX_TEXT = 512


class SearchHit(BaseModel):
    item_id: str
    score: float
    title: str = ""
    category_path: list[str] = Field(default_factory=list)
    image: str = Field(default="", description="the image's public URL, or its object key; never a server path")
    price: float | None = None
    shop: str | None = None
    in_stock: bool | None = Field(default=None, description="null: indexed before stock was recorded")
    duplicates: list[str] = Field(default_factory=list, description="collapsed near-duplicate listings")
    image_score: float | None = Field(default=None, description="image + text queries: the image cosine")
    text_score: float | None = Field(default=None, description="image + text queries: the title cosine")
    contributions: dict[str, float] | None = Field(default=None, description="explain: the re-ranker's "
                                                   "per-feature contributions to this hit's score")


class CategoryOut(BaseModel):
    shard: str
    category: str
    confidence: float
    searched_shards: list[str]
    routed: bool = Field(default=False, description="the vote was sure enough to search its shard alone")


class ObjectResult(BaseModel):
    box: tuple[int, int, int, int] | None = Field(description="the region in the photo's pixels; null for text")
    region_score: float
    category: CategoryOut | None
    no_match: bool = Field(default=False, description="the best hit scores below the no-match threshold: "
                           "this product is probably not in the catalog (hits are the closest, not matches)")
    hits: list[SearchHit]
    ranker: str = Field(default="visual", description="what ordered these hits: visual, a re-ranker model "
                        "(lightgbm:<version>), or visual-fallback (the re-ranker could not)")
    ranker_fallback: str | None = Field(default=None, description="why the re-ranker fell back: no_model, "
                                        "features_unavailable, error")


class SearchResponse(BaseModel):
    request_id: str = ""
    model_id: str
    image_size: tuple[int, int] | None = None
    objects: list[ObjectResult] = Field(description="one per searched product, the main one first")
    ranker: str = Field(default="visual", description="what ordered the hits (visual: the re-ranker is not in use)")
    timings_ms: dict[str, float]

    @property
    def hits(self) -> list[SearchHit]:
        return self.objects[0].hits if self.objects else []


class SearchFilters(BaseModel):
    """Restrictions every hit satisfies (applied inside the index, before the top ``limit``)."""

    model_config = ConfigDict(extra="forbid")

    category: str | None = Field(default=None, max_length=512, description="category path prefix, parts "
                                 "joined by '/', e.g. 'Fruit' or 'Fruit/Apple'")
    shop: list[str] | None = Field(default=None, min_length=1, max_length=50, description="any of these shops")
    price_min: float | None = Field(default=None, ge=0, allow_inf_nan=False, description="lowest price (inclusive)")
    price_max: float | None = Field(default=None, ge=0, allow_inf_nan=False, description="highest price (inclusive); "
                                    "items without a price never match a price filter")
    in_stock: bool | None = Field(default=None, description="true: only items in stock (an item whose stock is not "
                                  "tracked counts as in stock; one indexed before stock was recorded never matches)")

    @field_validator("category")
    @classmethod
    def _path(cls, v: str | None) -> str | None:
        if v is None:
            return v
        parts = v.split("/")
        if any(not p.strip() or p != p.strip() for p in parts):
            raise ValueError("a category path is non-empty parts joined by '/', without surrounding spaces")
        return v

    @model_validator(mode="after")
    def _price_order(self) -> SearchFilters:
        if self.price_min is not None and self.price_max is not None and self.price_min > self.price_max:
            raise ValueError("price_min is above price_max")
        return self

    @property
    def category_parts(self) -> list[str]:
        return self.category.split("/") if self.category else []


class SearchRequest(BaseModel):
    """``POST /v1/search`` as JSON: one image (``image_base64`` or ``image_url``), with optional filters."""

    model_config = ConfigDict(extra="forbid")

    image_base64: str | None = Field(default=None, description="the photo's bytes, base64 (standard alphabet)")
    image_url: str | None = Field(default=None, max_length=4096, description="an http(s) URL the API fetches "
                                  "(the ingest fetcher's address checks apply)")
    text: str | None = Field(default=None, max_length=MAX_TEXT, description="words describing the product")
    limit: int = Field(default=10, ge=1, le=MAX_LIMIT)
    objects: int = Field(default=1, ge=1, le=MAX_OBJECTS, description="products to search in the photo")
    filters: SearchFilters | None = None
    explain: bool = Field(default=False, description="add the routing decision and scores per stage")

    @model_validator(mode="after")
    def _one_image(self) -> SearchRequest:
        if self.image_base64 is not None and self.image_url is not None:
            raise ValueError("give image_base64 or image_url, not both")
        if self.image_base64 is None and self.image_url is None and not (self.text or "").strip():
            raise ValueError("nothing to search: give image_base64, image_url or text")
        return self


class FeedbackRequest(BaseModel):
    """``POST /v1/feedback``: what a shopper did with one result of a search."""

    model_config = ConfigDict(extra="forbid")

    request_id: str = Field(min_length=1, max_length=256, description="the search's request_id (X-Request-ID)")
    item_id: str = Field(min_length=1, max_length=512, description="one of the items that search showed")
    kind: Literal["click", "add_to_cart", "order"]
    amount: float | None = Field(default=None, ge=0, le=1e9, allow_inf_nan=False, description="orders only: "
                                 "the order's value")
    event_id: str | None = Field(default=None, min_length=1, max_length=128, description="idempotency key: a "
                                 "retried call with the same id counts once downstream (default: a new id)")
    event_time: float | None = Field(default=None, description="unix seconds when it happened (default: now)")


class FeedbackOut(BaseModel):
    event_id: str
    request_id: str
    kind: str


class ItemOut(BaseModel):
    item_id: str
    title: str = ""
    category_path: list[str] = Field(default_factory=list)
    image: str = ""
    price: float | None = None
    shop: str | None = None
    version: int
    duplicate_of: str | None = Field(default=None, description="the listing this one is a near duplicate of")
    model_id: str = ""
    indexed_at: float | None = None


class ErrorOut(BaseModel):
    """Every error the API answers: ``error`` by status, ``reason`` a stable code, ``detail`` for people."""

    error: str
    reason: str
    detail: str | Any = ""
