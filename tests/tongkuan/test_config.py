"""Configuration: one typed settings model per component, composed per process; docs/configuration.md's
reference is generated from them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tongkuan.config import (
    PROCESSES,
    ApiConfig,
    ConfigError,
    EdgeIndexSettings,
    QdrantIndexSettings,
    WorkerConfig,
    component_classes,
    load,
    reference,
)

REFERENCE = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"  # the README links it
BEGIN, END = "<!-- config-reference:begin -->", "<!-- config-reference:end -->"


def test_the_readme_reference_is_the_generated_one():
    text = REFERENCE.read_text()
    assert BEGIN in text and END in text, "docs/configuration.md lost its configuration reference markers"
    section = text.split(BEGIN, 1)[1].split(END, 1)[0].strip("\n")
    assert section == reference().strip("\n"), "run `python -m tongkuan.config` and paste it into docs/configuration.md"


def test_every_component_refuses_unknown_fields_and_is_documented():
    for root in PROCESSES.values():
        for name, field in root.model_fields.items():
            if name == "environment":
                continue
            for cls in component_classes(field.annotation):
                assert cls.model_config.get("extra") == "forbid", cls
                for fname, f in cls.model_fields.items():
                    assert f.description, f"{cls.__name__}.{fname} has no description"


def test_the_index_is_a_union_chosen_by_backend(monkeypatch):
    monkeypatch.setenv("TONGKUAN_INDEX__DIR", "/tmp/x")
    assert isinstance(load(WorkerConfig).index, EdgeIndexSettings)  # edge by default
    monkeypatch.delenv("TONGKUAN_INDEX__DIR")
    monkeypatch.setenv("TONGKUAN_INDEX__BACKEND", "qdrant")
    monkeypatch.setenv("TONGKUAN_INDEX__URL", "http://qdrant:6333")
    cfg = load(WorkerConfig)
    assert isinstance(cfg.index, QdrantIndexSettings) and cfg.index.url == "http://qdrant:6333"


@pytest.mark.parametrize(("env", "message"), [
    ({"TONGKUAN_WORKER__POOL": "gevent"}, "TONGKUAN_WORKER__POOL"),
    ({"TONGKUAN_WORKER__POOLS": "threads"}, "TONGKUAN_WORKER__POOLS: Extra inputs are not permitted"),
    ({"TONGKUAN_INDEX__BACKEND": "qdrant"}, "TONGKUAN_INDEX__URL: Field required"),
    ({"TONGKUAN_WORKER__RETRY_BACKOFF_MAX_S": "7200"}, "visibility_timeout_s"),
])
def test_a_bad_environment_is_refused_naming_the_variable(monkeypatch, env, message):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ConfigError, match=re.escape(message)):
        load(WorkerConfig)


def test_the_api_refuses_a_weak_hook_secret_outside_development(monkeypatch):
    monkeypatch.setenv("TONGKUAN_HOOK__SECRET", "changeme")
    with pytest.raises(ConfigError, match="placeholder"):
        load(ApiConfig)
    monkeypatch.setenv("TONGKUAN_ENVIRONMENT", "development")
    assert load(ApiConfig).hook.secret.get_secret_value() == "changeme"
    monkeypatch.delenv("TONGKUAN_HOOK__SECRET")
    with pytest.raises(ConfigError, match="TONGKUAN_HOOK: Field required"):
        load(ApiConfig)
