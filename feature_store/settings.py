"""Typed settings of the feature store (Feast) and of the aggregator that feeds it.

``FeatureStoreSettings.online`` picks the online store by its ``type`` (one table, as Feast does):
``sqlite`` (embedded, the default, a file in the data dir) or ``redis`` (the stack). The offline
store is always Feast's file store: Parquet files under ``<data_dir>/offline/``. Every model
forbids unknown keys, so a typo fails at start-up, not deep in a read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import unquote, urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator

from feature_store.features import LONGEST_WINDOW_S

VAR_DIR = Path(__file__).resolve().parent.parent / "var"


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SqliteOnlineSettings(_Settings):
    """Feast's SQLite online store: embedded, one file, one writer process at a time."""

    type: Literal["sqlite"] = Field(default="sqlite", description="which online store: sqlite (embedded) or redis")
    path: Path | None = Field(default=None, description="the database file (default <data_dir>/online.db)")


class RedisOnlineSettings(_Settings):
    """Feast's Redis online store (the stack). Keys are ``entity key + project``, so one Redis DB
    can hold several projects (tests use one project each)."""

    type: Literal["redis"] = Field(default="redis", description="which online store: sqlite (embedded) or redis")
    url: str = Field(default="redis://127.0.0.1:6379/0", description="redis://[:password@]host:port[/db]")
    key_ttl_seconds: int | None = Field(default=None, ge=1, description="Redis EXPIRE per item key (off)")

    @field_validator("url")
    @classmethod
    def _redis_url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("redis", "rediss") or not parts.hostname:
            raise ValueError("expected redis://[:password@]host:port[/db]")
        return v

    def connection_string(self) -> str:
        """The URL in Feast's ``host:port,db=N,password=...,ssl=true`` form."""
        parts = urlsplit(self.url)
        out = [f"{parts.hostname}:{parts.port or 6379}"]
        db = parts.path.strip("/")
        if db:
            out.append(f"db={int(db)}")
        if parts.password:
            out.append(f"password={unquote(parts.password)}")
        if parts.scheme == "rediss":
            out.append("ssl=true")
        return ",".join(out)


OnlineStoreSettings = Annotated[SqliteOnlineSettings | RedisOnlineSettings, Field(discriminator="type")]


class FeatureStoreSettings(_Settings):
    """The Feast store: registry, offline Parquet files and (for SQLite) the online file live in
    ``data_dir``."""

    data_dir: Path = Field(default=VAR_DIR / "features", description="registry, offline Parquet, SQLite files")
    project: str = Field(default="tongkuan", pattern=r"^[a-z][a-z0-9_]{0,62}$",
                         description="Feast project (also the Redis key suffix)")
    online: OnlineStoreSettings = Field(default=SqliteOnlineSettings(), description="the online store "
                                        "(ONLINE__TYPE sqlite or redis, and that store's fields)")
    registry_cache_ttl_seconds: int = Field(default=600, ge=0, description="0: cache the registry forever")


class AggregatorSettings(_Settings):
    """The stream aggregator (``feature_store.aggregator``). Times are seconds."""

    state_path: Path | None = Field(default=None, description="its SQLite state (default <data_dir>/aggregator.db)")
    max_lateness_s: float = Field(default=LONGEST_WINDOW_S, gt=0, le=LONGEST_WINDOW_S,
                                  description="an event older than now minus this is rejected (too_old)")
    max_future_s: float = Field(default=300.0, ge=0, le=86400,
                                description="an event newer than now plus this is rejected (in_future)")
    ctr_prior_strength: float = Field(default=100.0, gt=0, description="m: pseudo-impressions of the prior")
    cvr_prior_strength: float = Field(default=20.0, gt=0, description="m': pseudo-clicks of the prior")
    default_ctr: float = Field(default=0.02, ge=0, le=1, description="prior of the prior (no data at all)")
    default_cvr: float = Field(default=0.05, ge=0, le=1, description="prior of the prior (no data at all)")
    row_resolution_s: float = Field(
        default=0.0, ge=0, le=3600,
        description="0: a feature row per event time; R > 0: one per item per R-second bucket, stamped with "
                    "the bucket's end (fewer offline rows; a training row sees its bucket's earlier events "
                    "only from the next bucket on: staler by at most R, never ahead)")
    # refresh() pushes a row when the item's values as of now differ from its last row (windows
    # slide even without events), and re-pushes an unchanged row this long after the last one, so
    # that a live item never falls out of its view's TTL (checked against the TTLs at start-up).
    behaviour_keepalive_s: float = Field(default=86400.0, gt=0, description="< the behaviour TTL (2 days)")
    profile_keepalive_s: float = Field(default=7 * 86400.0, gt=0, description="< the profile TTL (30 days)")


__all__ = ["AggregatorSettings", "FeatureStoreSettings", "OnlineStoreSettings", "RedisOnlineSettings",
           "SqliteOnlineSettings", "VAR_DIR"]
