"""Typed settings, read from the environment (prefix ``TONGKUAN_``) and validated at start-up."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent
# The GroceryStore dataset beside the checkout (shared/ sits next to the repository).
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "datasets" / "grocery"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TONGKUAN_", extra="forbid")

    # Where the embedded index and other runtime state live.
    data_dir: Path = Field(default=REPO_ROOT / "var")
    # Models: ONNX files and the registry live here (built by `make model`).
    model_dir: Path = Field(default=REPO_ROOT / "models")
    # Which registered model serves; empty = the registry's active model.
    model: str = ""

    # Image hygiene limits (bytes on the wire, decoded pixels: decompression bombs).
    max_image_bytes: int = Field(default=20 * 1024 * 1024, gt=0)
    max_image_pixels: int = Field(default=40_000_000, gt=0)

    # Fetching images by URL.
    fetch_connect_timeout_s: float = Field(default=3.0, gt=0)
    fetch_read_timeout_s: float = Field(default=10.0, gt=0)
    fetch_max_redirects: int = Field(default=3, ge=0)
    # Hosts/CIDRs exempt from the private-address refusal (e.g. an internal object store).
    fetch_allow: list[str] = Field(default_factory=list)
    # Object-store keys (no scheme) resolve below this directory in the embedded mode.
    object_root: Path | None = None

    # Vector index.
    index_backend: Literal["edge", "qdrant"] = "edge"
    qdrant_url: str = ""
    qdrant_collection: str = "tongkuan"
    qdrant_api_key: str = ""
    qdrant_timeout_s: float = Field(default=10.0, gt=0)
    qdrant_replication_factor: int = Field(default=2, ge=1)
    qdrant_write_consistency_factor: int = Field(default=1, ge=1)
    qdrant_shards_per_key: int = Field(default=1, ge=1)
    # HNSW and quantization (both backends). ef is the search-time beam width.
    index_hnsw_m: int = Field(default=16, ge=4, le=128)
    index_hnsw_ef_construct: int = Field(default=128, ge=8)
    index_hnsw_ef: int = Field(default=128, ge=8)
    index_quantization: Literal["none", "int8", "binary"] = "none"

    # Whether the API process serves search (opens the index). The embedded Edge index is owned by
    # one process: in the local stack the ingest worker owns it and the API serves the hook only.
    serve_search: bool = True

    # Ingest.
    ingest_batch_size: int = Field(default=32, ge=1, le=1024)
    # Chunks of one ingest task embedded concurrently by the worker, each a whole fetch → decode →
    # hash → pre-process → model pass; with ``ort_threads`` 0 each model run then gets
    # cores/streams threads. 1 (default) = one chunk at a time, its successor prepared on a helper
    # thread. On this 2-core machine 2 streams ran the model alone 13-25 % faster but ingest no faster
    # end to end, at 3x the latency (make bench-ingest --streams 2, README).
    ingest_streams: int = Field(default=1, ge=1, le=16)
    # Embedding processes of an ingest worker (``workers.embed_pool``): each chunk is fetched,
    # decoded, hashed and embedded in one of them, and the worker process only checks twins and
    # writes (it owns the index). 0 = in the worker process, on its task threads. In process on the
    # 2-core dev machine, 2 processes reached 0.93 of the model-only ceiling against 0.89 for 2 task
    # threads (python -m tongkuan.bench_ingest --in-process, README).
    ingest_processes: int = Field(default=0, ge=0, le=64)

    # ONNX Runtime threads (0 = ORT default).
    ort_threads: int = Field(default=0, ge=0)
    # Let idle ORT threads busy-wait. Off by default: with the broker, dispatcher and Redis on the
    # same cores, spinning threads steal the CPU they wait for (make bench-ingest: 62.5 -> 71.9
    # items/s end to end when turned off). Turn it on for a dedicated inference box.
    ort_spinning: bool = False

    @property
    def index_dir(self) -> Path:
        return self.data_dir / "index"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
