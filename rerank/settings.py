"""Settings of the re-ranker in the API (env ``TONGKUAN_RERANK__*``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

VAR_DIR = Path(__file__).resolve().parent.parent / "var"


class RerankSettings(BaseModel):
    """The API's re-ranker: the registry's active LightGBM model over the feature store's features."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(default=True, description="re-rank image searches with the registry's active model "
                          "(none active: visual order, ranker visual-fallback)")
    models_dir: Path = Field(default=VAR_DIR / "rerank" / "models", description="the model registry "
                             "(versions and the ACTIVE pointer; `python -m offline.simulate` and training write it)")
    tie_margin: float = Field(default=0.02, ge=0, le=1, description="visual-score gap under which two products "
                              "below the first may trade places (0: never); the best visual product stays first")
    min_feature_coverage: float = Field(default=0.0, ge=0, le=1, description="fall back to visual order when the "
                                        "feature store knows fewer of the candidates than this share")
    refresh_s: float = Field(default=30.0, gt=0, description="how often the API follows the registry's ACTIVE pointer")
