"""Request/response families of the query side (shared by the in-process API, CLI and HTTP)."""

from __future__ import annotations

from pydantic import BaseModel, Field


class SearchHit(BaseModel):
    item_id: str
    score: float
    title: str = ""
    category_path: list[str] = Field(default_factory=list)
    image: str = Field(default="", description="the image's public URL, or its object key; never a server path")
    duplicates: list[str] = Field(default_factory=list, description="collapsed near-duplicate listings")


class CategoryOut(BaseModel):
    shard: str
    category: str
    confidence: float
    searched_shards: list[str]


class ObjectResult(BaseModel):
    box: tuple[int, int, int, int]
    region_score: float
    category: CategoryOut | None
    hits: list[SearchHit]


class SearchResponse(BaseModel):
    model_id: str
    objects: list[ObjectResult] = Field(description="one per searched product, the main one first")
    timings_ms: dict[str, float]

    @property
    def hits(self) -> list[SearchHit]:
        return self.objects[0].hits if self.objects else []
