"""Settings of the vector index: the embedded Qdrant Edge or a Qdrant server, as a discriminated
union on ``backend`` (env ``TONGKUAN_INDEX__BACKEND=edge|qdrant``, then ``TONGKUAN_INDEX__*``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, SecretStr, Tag

from index.placement import DEFAULT_MAX_SHARDS

VAR_DIR = Path(__file__).resolve().parent.parent / "var"


class _Hnsw(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    hnsw_m: int = Field(default=16, ge=4, le=128, description="HNSW graph degree")
    hnsw_ef_construct: int = Field(default=128, ge=8, description="HNSW build beam width")
    hnsw_ef: int = Field(default=128, ge=8, description="HNSW search beam width")


class _Sharding(_Hnsw):
    # Why 32: index/placement.py (DEFAULT_MAX_SHARDS).
    max_shards: int = Field(default=DEFAULT_MAX_SHARDS, ge=1, description="most physical shards per generation "
                            "(Edge shard directories, Qdrant shard keys): categories past it share one overflow "
                            "shard, told apart by the payload shard key; a category keeps the shard it was "
                            "first written to, so a change affects new categories only")


class EdgeIndexSettings(_Sharding):
    """Embedded: one on-disk Qdrant Edge shard per top-level category (up to max_shards); one process opens it."""

    backend: Literal["edge"] = Field(default="edge", description="which index: edge (embedded) or qdrant (a server)")
    dir: Path = Field(default=VAR_DIR / "index", description="where the generations' shard directories live")
    quantization: Literal["none", "int8"] = Field(default="none", description="int8 copies for search, "
                                                  "rescored with the float vectors")


class QdrantIndexSettings(_Sharding):
    """A Qdrant server or cluster: one collection per model generation, custom shard keys."""

    backend: Literal["qdrant"] = Field(default="qdrant", description="which index: edge (embedded) or qdrant (a server)")
    url: str = Field(description="server URL, or ':memory:' for qdrant-client's local mode (tests)")
    api_key: SecretStr = Field(default=SecretStr(""), description="server API key")
    collection: str = Field(default="tongkuan", description="alias of the serving collection; generations are "
                            "<collection>__<model slug>")
    timeout_s: float = Field(default=10.0, gt=0, description="request timeout")
    replication_factor: int = Field(default=2, ge=1, description="copies of every shard")
    write_consistency_factor: int = Field(default=1, ge=1, description="replicas that must acknowledge a write")
    shards_per_key: int = Field(default=1, ge=1, description="shards per shard key (top-level category)")
    quantization: Literal["none", "int8", "binary"] = Field(default="none", description="quantized copies "
                                                            "for search, rescored with the float vectors")


def _backend(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("backend", "edge"))
    return str(getattr(value, "backend", "edge"))


IndexSettings = Annotated[
    Annotated[EdgeIndexSettings, Tag("edge")] | Annotated[QdrantIndexSettings, Tag("qdrant")],
    Discriminator(_backend),
]
