"""The API serves the generation the pointer names and follows a blue/green switch, one model per query."""

import pytest
from fastapi.testclient import TestClient

import tongkuan.api as api
from events.bus import InMemoryBus
from events.hook import HookSettings
from index.generations import GenerationManager
from tests.vision.conftest import DATA, model_dir  # noqa: F401 - fixture
from tongkuan.settings import Settings
from vision.registry import ModelRegistry


def test_api_follows_generation_switch(tmp_path, model_dir, monkeypatch):  # noqa: F811
    photo = DATA / "dataset/iconic-images-and-descriptions/Fruit/Apple/Pink-Lady/Pink-Lady_Iconic.jpg"
    if not photo.exists():
        pytest.skip("grocery dataset not available")
    monkeypatch.setattr(api, "REFRESH_S", 0.0)
    settings = Settings(model_dir=model_dir, data_dir=tmp_path / "var")
    reg = ModelRegistry(model_dir)
    active = reg.get(reg.active)
    other = reg.get("lite0-imagenet")
    app = api.create_app(settings=settings, producer=InMemoryBus().producer(),
                         hook_settings=HookSettings(hook_secret="x" * 40))
    with TestClient(app) as client:
        r = client.post("/v1/search", content=photo.read_bytes())
        assert r.status_code == 200, r.text
        assert r.json()["model_id"] == active.model_id  # first start adopts the active model
        mgr = GenerationManager(settings, registry=None)
        mgr.begin(other.model_id, name=other.name, dim=other.dim)
        r = client.post("/v1/search", content=photo.read_bytes())
        assert r.json()["model_id"] == active.model_id  # building does not serve
        mgr.switch(other.model_id)
        r = client.post("/v1/search", content=photo.read_bytes())
        assert r.status_code == 200 and r.json()["model_id"] == other.model_id
