"""Settings of the vision runtime (which model serves, how ONNX Runtime runs) and of image decoding.

Plain typed models: the composition root (``tongkuan.config``) reads them from the environment as
``TONGKUAN_RUNTIME__*`` and ``TONGKUAN_IMAGE__*`` and hands them to whoever needs them.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

MODELS_DIR = Path(__file__).resolve().parent.parent / "models"


class RuntimeSettings(BaseModel):
    """The embedding model and ONNX Runtime."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model_dir: Path = Field(default=MODELS_DIR, description="ONNX files and registry.json (built by `make model`)")
    model: str = Field(default="", description="registered model that serves; empty = the registry's active one")
    ort_threads: int = Field(default=0, ge=0, description="ONNX Runtime intra-op threads (0 = ORT's default, "
                             "or the cores shared out between a worker's model runs)")
    # Off by default: with the broker, dispatcher and Redis on the same cores, spinning threads steal
    # the CPU they wait for (make bench-ingest: 62.5 -> 71.9 items/s end to end when turned off).
    ort_spinning: bool = Field(default=False, description="let idle ORT threads busy-wait (a dedicated inference box)")
    text_model: str = Field(default="minilm-l6-v2-text", description="text model of the items' title vectors and "
                            "of text queries (make model); empty: none. A generation adopted without it has no "
                            "title vectors (text search answers 422) until a re-embed")


class ImageSettings(BaseModel):
    """Limits on every picture tongkuan reads: on the wire, in a file, in an upload, decoded."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_bytes: int = Field(default=20 * 1024 * 1024, gt=0, description="bytes of one encoded picture at most")
    max_pixels: int = Field(default=40_000_000, gt=0,
                            description="decoded pixels at most, read from the header before decoding (bombs)")
