"""Settings of the query pipeline (env ``TONGKUAN_SEARCH__*``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from index.settings import VAR_DIR
from query.category import DEFAULT_K, DEFAULT_TEMPERATURE


class SearchSettings(BaseModel):
    """The query pipeline: candidates, the category vote and shard routing."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    candidate_k: int = Field(default=60, ge=1, le=1000, description="visual candidates per query (the re-rank pool)")
    category_k: int = Field(default=DEFAULT_K, ge=1, le=200, description="neighbours in the category vote")
    category_temperature: float = Field(default=DEFAULT_TEMPERATURE, gt=0, le=10, description="the vote's "
                                        "neighbour weights exp(score / temperature)")
    shard_min_confidence: float = Field(default=0.6, ge=0, le=1, description="search only the voted shard "
                                        "when its probability is at least this, else every shard")
    classifier_weight: float = Field(default=0.5, ge=0, le=1, description="weight of the model's classifier "
                                     "head against the neighbours' vote")
    # Calibrated for the shipped model on val (python -m offline calibrate, docs/query-calibration.md):
    # products left out of the gallery as negatives, rejection precision 0.90 at recall 0.79, and 8.8 %
    # of in-catalog queries flagged (15 of them wrong anyway). Another model needs its own value.
    # Why 0.6: docs/text-search.md (val, chosen on one half of the classes and reported on the other).
    hybrid_image_weight: float = Field(default=0.6, ge=0, le=1, description="image + text queries: a candidate "
                                       "scores w * image cosine + (1 - w) * title cosine")
    no_match_below: float | None = Field(default=0.39, ge=-1, le=1, description="a product whose best hit "
                                         "scores (cosine) below this is answered no_match (not in the catalog); "
                                         "unset (null): never")
    image_base_url: str = Field(default="", description="where the object store serves images: a hit shows "
                                "<base>/<object key>; empty: the key alone (never a server path)")


class JobSettings(BaseModel):
    """Bulk jobs (``query.jobs``; env ``TONGKUAN_JOBS__*``): the API submits them and serves their results."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dir: Path = Field(default=VAR_DIR / "jobs", description="where bulk jobs write their JSONL (the worker "
                      "writes, the API serves: one machine or a shared volume)")
    ttl_s: int = Field(default=7 * 24 * 3600, ge=60, description="how long a job's record is kept")
