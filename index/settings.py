"""Settings of the vector index: the embedded Qdrant Edge or a Qdrant server, as a discriminated
union on ``backend`` (env ``TONGKUAN_INDEX__BACKEND=edge|qdrant``, then ``TONGKUAN_INDEX__*``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, SecretStr, Tag

from index.placement import DEFAULT_MAX_SHARDS

VAR_DIR = Path(__file__).resolve().parent.parent / "var"
# Candidates rescored per result wanted when the caller names no oversampling. Measured on the
# model's 512-d embeddings at 100k items, HNSW M=16/ef 128 (offline.bench.query_engines): int8
# reaches the float graph's recall@10 (0.97) at 2; binary (1 bit, 8-bit queries) needs 8 for 0.95
# (0.74 at 2, 0.88 at 4).
DEFAULT_OVERSAMPLING: dict[str, float] = {"int8": 2.0, "binary": 8.0}


class _Hnsw(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    hnsw_m: int = Field(default=16, ge=4, le=128, description="HNSW graph degree")
    hnsw_ef_construct: int = Field(default=128, ge=8, description="HNSW build beam width")
    hnsw_ef: int = Field(default=128, ge=8, description="HNSW search beam width")


class _Quantized(_Hnsw):
    quantization: Literal["none", "int8", "binary"] = Field(default="none", description="quantized copies "
                                                            "for search (int8: a byte per dimension; binary: "
                                                            "a bit, queries at 8 bits), rescored with the "
                                                            "float vectors")
    quantization_rescore: bool = Field(default=True, description="rescore the quantized candidates with "
                                       "the float vectors (off: quantized scores are returned)")
    # Why per quantization: DEFAULT_OVERSAMPLING.
    quantization_oversampling: float | None = Field(default=None, ge=1.0, description="candidates rescored "
                                                    "per result wanted (limit x this), with quantization; "
                                                    "none: 2 for int8, 8 for binary")


class _Sharding(_Quantized):
    # Why 32: index/placement.py (DEFAULT_MAX_SHARDS).
    max_shards: int = Field(default=DEFAULT_MAX_SHARDS, ge=1, description="most physical shards per generation "
                            "(Edge shard directories, Qdrant shard keys): categories past it share one overflow "
                            "shard, told apart by the payload shard key; a category keeps the shard it was "
                            "first written to, so a change affects new categories only")


class EdgeIndexSettings(_Sharding):
    """Embedded: one on-disk Qdrant Edge shard per top-level category (up to max_shards); one process opens it."""

    backend: Literal["edge"] = Field(default="edge", description="which index: edge (embedded) or qdrant (a server)")
    dir: Path = Field(default=VAR_DIR / "index", description="where the generations' shard directories live")


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


def _backend(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("backend", "edge"))
    return str(getattr(value, "backend", "edge"))


IndexSettings = Annotated[
    Annotated[EdgeIndexSettings, Tag("edge")] | Annotated[QdrantIndexSettings, Tag("qdrant")],
    Discriminator(_backend),
]
