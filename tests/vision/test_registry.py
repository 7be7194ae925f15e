from __future__ import annotations

import json
from dataclasses import replace

import pytest

from offline.training.imagenet import IMAGENET_MODEL, build_imagenet_model
from vision.registry import ModelNotAvailable, ModelRegistry, sha256_file
from vision.runtime import VisionPipeline
from vision.settings import RuntimeSettings


def _fake(tmp_path, name="m1", content=b"onnx-bytes"):
    (tmp_path / f"{name}.onnx").write_bytes(content)
    sha = sha256_file(tmp_path / f"{name}.onnx")
    return replace(IMAGENET_MODEL, name=name, file=f"{name}.onnx", sha256=sha)


def test_register_get_activate(tmp_path):
    reg = ModelRegistry(tmp_path)
    a, b = _fake(tmp_path, "a"), _fake(tmp_path, "b", b"other")
    reg.register_model(a)
    reg.register_model(b)
    assert reg.active == "a" and reg.names() == ["a", "b"]
    reg.set_active("b")
    assert reg.get().name == "b" and reg.get("a") == a
    entry, path = reg.resolve()
    assert path == tmp_path / "b.onnx" and entry.model_id == f"b@{entry.sha256[:12]}"
    reg.register_model(a)  # identical: no-op
    with pytest.raises(ValueError):
        reg.register_model(replace(a, pooling={"type": "max"}))
    reg.register_model(replace(a, pooling={"type": "max"}), overwrite=True)
    assert reg.get("a").pooling == {"type": "max"}
    with pytest.raises(ModelNotAvailable):
        reg.set_active("nope")
    assert json.loads(reg.path.read_text())["active"] == "b"


def test_missing_or_mismatched_file_says_run_make_model(tmp_path):
    reg = ModelRegistry(tmp_path)
    with pytest.raises(ModelNotAvailable, match="make model"):
        reg.resolve()
    a = _fake(tmp_path, "a")
    reg.register_model(a)
    (tmp_path / "a.onnx").write_bytes(b"tampered")
    with pytest.raises(ModelNotAvailable, match="make model"):
        reg.resolve()
    (tmp_path / "a.onnx").unlink()
    with pytest.raises(ModelNotAvailable, match="missing.*make model"):
        VisionPipeline.from_settings(RuntimeSettings(model_dir=tmp_path))
    with pytest.raises(ModelNotAvailable, match="not registered"):
        reg.get("zzz")


def test_export_is_cached_and_deterministic(model_dir, tmp_path):
    logs: list[str] = []
    entry = build_imagenet_model(model_dir, log=logs.append)
    assert "up to date" in logs[-1]
    # A second, independent export in another directory yields the same bytes.
    other = build_imagenet_model(tmp_path, log=lambda _m: None)
    assert other.sha256 == entry.sha256
    assert ModelRegistry(model_dir).get(entry.name).sha256 == entry.sha256
