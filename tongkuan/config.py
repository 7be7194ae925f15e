"""The composition root's configuration: each process reads the settings of the components it runs.

Every component owns a typed settings model next to its code (``vision.settings``,
``index.settings``, ``workers.fetch``, ``workers.settings``, ``events.hook``, ...). A process's
config composes the ones it needs and reads them from the environment when the process starts:
``TONGKUAN_<COMPONENT>__<FIELD>``, e.g. ``TONGKUAN_INDEX__BACKEND=qdrant``,
``TONGKUAN_WORKER__POOL=threads``, ``TONGKUAN_HOOK__SECRET=...``. Unknown fields of a component are
refused (a typo fails at start-up instead of being ignored).

``python -m tongkuan.config`` prints the configuration reference (docs/configuration.md is generated from it,
and ``tests/tongkuan/test_config.py`` keeps the two equal).
"""

from __future__ import annotations

import os
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from events.hook import HookSettings, secret_problem
from events.kafka import KafkaSettings
from feature_store.consumer import FeatureConsumerSettings
from feature_store.settings import AggregatorSettings, FeatureStoreSettings
from index.settings import EdgeIndexSettings, IndexSettings, QdrantIndexSettings
from query.interactions import InteractionSettings
from query.settings import JobSettings, SearchSettings
from rerank.settings import RerankSettings
from vision.settings import ImageSettings, RuntimeSettings
from workers.fetch import FetchSettings
from workers.settings import CelerySettings, DispatcherSettings, WorkerSettings

Environment = Literal["development", "staging", "production"]
ENV_PREFIX = "TONGKUAN_"
ENV_DELIMITER = "__"


class ConfigError(RuntimeError):
    """The environment does not make a valid configuration; the message names every bad value."""


class ApiSettings(BaseModel):
    """The API process (env ``TONGKUAN_API__*``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    serve_search: bool = Field(default=True, description="open the index and serve the query routes")
    index_owner_url: str = Field(default="", description="embedded index only: the index read service of the "
                                 "process that owns it (the worker's TONGKUAN_WORKER__INDEX_READ_PORT, e.g. "
                                 "http://127.0.0.1:9110); search goes through it while that process ingests. "
                                 "Empty: this process opens the index itself")
    serving_refresh_s: float = Field(default=2.0, gt=0, description="how often a background thread follows "
                                     "the serving generation (requests never wait for a model load)")
    # Access (query.access). The mode is decided in one place: query.access.access_from_settings.
    keys_file: Path | None = Field(default=None, description="JSON file of API keys (`tongkuan keys add`; hashed "
                                   "at rest, mode 0600); required outside development (in development, without "
                                   "one, every route is open)")
    keys_reload_s: float = Field(default=2.0, gt=0, description="how often the keys file is checked for changes "
                                 "(a revoked key is refused within this, no restart)")
    cors_origins: list[str] = Field(default_factory=list, description="browser origins allowed to call the API "
                                    "(JSON list, e.g. `[\"https://shop.example\"]`); empty: no cross-origin calls")
    # Slow clients (query.body): uvicorn has no body read timeout, so a client that stalls mid-upload
    # would hold its connection and the request forever.
    body_idle_timeout_s: float = Field(default=10.0, gt=0, description="longest wait for the next chunk of a "
                                       "search upload (408 after it)")
    min_body_rate_bps: int = Field(default=16384, ge=0, description="slowest average upload rate in bytes/s "
                                   "accepted once the grace period is over (408 below it; 0 = no minimum)")
    body_rate_grace_s: float = Field(default=5.0, ge=0, description="seconds of an upload before the minimum "
                                     "rate applies")
    # Decode + localize + embed is CPU-bound and ONNX Runtime already spreads one run over the cores, so
    # more runs at once than cores only add latency; each one may hold a decoded picture of up to
    # TONGKUAN_IMAGE__MAX_PIXELS (40 MP ≈ 120 MB RGB), so the cap of 8 bounds that memory (~1 GB).
    max_concurrent_decodes: int | None = Field(default=None, ge=1, description="searches decoding and embedding "
                                               "at once; unset: the CPU count, at most 8")
    decode_queue_timeout_s: float = Field(default=1.0, ge=0, description="how long a search waits for a decode "
                                          "slot before it is answered 503 with Retry-After")

    def decode_slots(self) -> int:
        """``max_concurrent_decodes``, or the CPU count capped at 8 when unset."""
        return self.max_concurrent_decodes or min(os.cpu_count() or 1, 8)


class _Root(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_nested_delimiter=ENV_DELIMITER,
                                      extra="forbid", frozen=True)

    environment: Environment = Field(default="production", description="development relaxes the checks "
                                     "meant for production (weak hook secret; local image refs on by "
                                     "default; the API open without a keys file); processes say so at start-up")

    @model_validator(mode="before")
    @classmethod
    def _local_refs_follow_the_environment(cls, data: Any) -> Any:
        """An unset TONGKUAN_FETCH__LOCAL_REFS is on in development and off elsewhere."""
        if "fetch" not in cls.model_fields or not isinstance(data, dict):
            return data
        development = data.get("environment", "production") == "development"
        fetch = data.get("fetch")
        if fetch is None or isinstance(fetch, dict):
            fetch = dict(fetch or {})
            if fetch.get("local_refs") is None:
                fetch["local_refs"] = development
            return {**data, "fetch": fetch}
        if isinstance(fetch, FetchSettings) and fetch.local_refs is None:
            return {**data, "fetch": fetch.model_copy(update={"local_refs": development})}
        return data


class WorkerConfig(_Root):
    """``celery -A tongkuan.worker worker``: applies catalog events to the index."""

    runtime: RuntimeSettings = RuntimeSettings()
    image: ImageSettings = ImageSettings()
    index: IndexSettings = EdgeIndexSettings()
    fetch: FetchSettings = FetchSettings()
    celery: CelerySettings = CelerySettings()
    worker: WorkerSettings = WorkerSettings()
    kafka: KafkaSettings = KafkaSettings()

    @model_validator(mode="after")
    def _retry_fits_visibility(self) -> WorkerConfig:
        if self.worker.retry_backoff_max_s >= self.celery.visibility_timeout_s:
            raise ValueError("worker.retry_backoff_max_s must be < celery.visibility_timeout_s: a task waiting "
                             "for its retry is unacked and Redis would hand it to another worker meanwhile")
        return self


class DispatcherConfig(_Root):
    """``python -m tongkuan.dispatcher``: ``catalog.items`` → batched Celery tasks."""

    dispatcher: DispatcherSettings = DispatcherSettings()
    celery: CelerySettings = CelerySettings()
    kafka: KafkaSettings = KafkaSettings()


class FeaturesConfig(_Root):
    """``python -m tongkuan.features``: ``catalog.features``, ``search.interactions`` (and prices and
    categories from ``catalog.items``) → the aggregator → the Feast feature store."""

    features: FeatureConsumerSettings = FeatureConsumerSettings()
    feature_store: FeatureStoreSettings = FeatureStoreSettings()
    aggregator: AggregatorSettings = AggregatorSettings()
    kafka: KafkaSettings = KafkaSettings()


class ApiConfig(_Root):
    """``uvicorn --factory tongkuan.api:create_app``: the upload hook and the query routes."""

    api: ApiSettings = ApiSettings()
    hook: HookSettings
    runtime: RuntimeSettings = RuntimeSettings()
    image: ImageSettings = ImageSettings()
    index: IndexSettings = EdgeIndexSettings()
    search: SearchSettings = SearchSettings()
    kafka: KafkaSettings = KafkaSettings()
    celery: CelerySettings = CelerySettings()  # the bulk similar-items jobs are sent to the workers
    jobs: JobSettings = JobSettings()
    interactions: InteractionSettings = InteractionSettings()  # impressions and feedback (search.interactions)
    rerank: RerankSettings = RerankSettings()
    feature_store: FeatureStoreSettings = FeatureStoreSettings()  # what the re-ranker reads (online)
    # Query image URLs are fetched with these limits (local refs never: a shopper names no server
    # path); the object root, where local refs are on, is what the web page's /images serves.
    fetch: FetchSettings = FetchSettings()

    @model_validator(mode="after")
    def _secret_fits_environment(self) -> ApiConfig:
        problem = secret_problem(self.hook.secret.get_secret_value(), self.environment)
        if problem:
            raise ValueError(problem)
        return self


class ToolConfig(_Root):
    """The ``tongkuan`` CLI and the offline tools (demo, evaluation, benchmarks): in-process ingest
    and search on the configured index."""

    runtime: RuntimeSettings = RuntimeSettings()
    image: ImageSettings = ImageSettings()
    index: IndexSettings = EdgeIndexSettings()
    fetch: FetchSettings = FetchSettings()
    worker: WorkerSettings = WorkerSettings()
    celery: CelerySettings = CelerySettings()
    search: SearchSettings = SearchSettings()


PROCESSES: dict[str, type[_Root]] = {
    "worker": WorkerConfig,
    "dispatcher": DispatcherConfig,
    "features": FeaturesConfig,
    "api": ApiConfig,
    "cli": ToolConfig,
}

R = typing.TypeVar("R", bound=_Root)


def load(cls: type[R], **overrides: Any) -> R:
    """The process's config from the environment (and ``overrides``); ``ConfigError`` names every
    bad or missing value by its environment variable."""
    try:
        return cls(**overrides)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = [str(p) for p in err.get("loc", ()) if not str(p).startswith("function-")]
            loc = [p for p in loc if p not in ("edge", "qdrant")]  # union tags
            var = ENV_PREFIX + ENV_DELIMITER.join(p.upper() for p in loc) if loc else ENV_PREFIX + "*"
            lines.append(f"  {var}: {err.get('msg')}")
        raise ConfigError(f"invalid {cls.__name__} configuration:\n" + "\n".join(lines)) from None


# --------------------------------------------------------------------------------------------------
# The configuration reference


def _components() -> dict[str, list[tuple[type[BaseModel], list[str]]]]:
    """Component name → its settings classes (a union has several) → which processes read it."""
    out: dict[str, list[tuple[type[BaseModel], list[str]]]] = {}
    for process, root in PROCESSES.items():
        for name, field in root.model_fields.items():
            if name == "environment":
                continue
            for cls in component_classes(field.annotation):
                entries = out.setdefault(name, [])
                for known, procs in entries:
                    if known is cls:
                        procs.append(process)
                        break
                else:
                    entries.append((cls, [process]))
    return out


def component_classes(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found = []
    for arg in typing.get_args(annotation):
        found += component_classes(arg)
    return found


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return " \\| ".join(str(a) for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type_name(a) for a in typing.get_args(annotation))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(annotation))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    if annotation is type(None):
        return "none"
    return getattr(annotation, "__name__", str(annotation))


def _default(field: Any) -> str:
    if field.is_required():
        return "**required**"
    value = field.get_default(call_default_factory=True)
    if hasattr(value, "get_secret_value"):
        value = value.get_secret_value()
    text = str(value)
    repo = str(_repo_root())
    if text.startswith(repo):
        text = "<repo>" + text[len(repo):]
    return f"`{text}`" if text != "" else '`""`'


def _repo_root():
    from pathlib import Path

    return Path(__file__).resolve().parent.parent


def reference() -> str:
    """The configuration reference as Markdown, generated from the settings classes."""
    rows = ["| variable | type | default | what it does |", "|---|---|---|---|",
            f"| `{ENV_PREFIX}ENVIRONMENT` | {_type_name(_Root.model_fields['environment'].annotation)} | "
            f"`production` | {_Root.model_fields['environment'].description} |"]
    for component, entries in _components().items():
        for cls, procs in entries:
            backend = cls.model_fields.get("backend")
            title = f"**{component}**" + (f" (`backend={backend.default}`)" if backend is not None else "")
            doc = (cls.__doc__ or cls.__name__).strip().splitlines()[0]
            rows.append(f"| {title} — {doc} | | | read by: "
                        f"{', '.join(procs)} |")
            for name, field in cls.model_fields.items():
                var = f"{ENV_PREFIX}{component.upper()}{ENV_DELIMITER}{name.upper()}"
                nested = component_classes(field.annotation)
                if not nested:
                    rows.append(f"| `{var}` | {_type_name(field.annotation)} | {_default(field)} | "
                                f"{field.description or ''} |")
                    continue
                rows.append(f"| `{var}__*` | {_type_name(field.annotation)} | {_default(field)} | "
                            f"{field.description or ''} |")
                seen: set[str] = set()
                for sub_cls in nested:  # a union: each member's fields once (the first member's row)
                    for sub, sf in sub_cls.model_fields.items():
                        if sub in seen:
                            continue
                        seen.add(sub)
                        rows.append(f"| `{var}{ENV_DELIMITER}{sub.upper()}` | {_type_name(sf.annotation)} | "
                                    f"{_default(sf)} | ({sub_cls.__name__}) {sf.description or ''} |")
    return "\n".join(rows) + "\n"


__all__ = [
    "ApiConfig",
    "ApiSettings",
    "ConfigError",
    "DispatcherConfig",
    "EdgeIndexSettings",
    "FeaturesConfig",
    "PROCESSES",
    "QdrantIndexSettings",
    "ToolConfig",
    "WorkerConfig",
    "load",
    "reference",
]


if __name__ == "__main__":
    sys.stdout.write(reference())
