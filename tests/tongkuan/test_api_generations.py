"""The API serves the generation the pointer names and follows a blue/green switch, one model per
query; the switch is followed in the background (no request loads a model)."""

import time

from fastapi.testclient import TestClient

import tongkuan.api as api
from events.bus import InMemoryBus
from events.hook import HookSettings
from index.generations import GenerationManager
from index.settings import EdgeIndexSettings
from tests.conftest import grocery_root
from tongkuan.config import ApiConfig, ApiSettings
from vision.registry import ModelRegistry
from vision.settings import RuntimeSettings


def test_api_follows_generation_switch(tmp_path, model_dir):
    photo = grocery_root() / "dataset/iconic-images-and-descriptions/Fruit/Apple/Pink-Lady/Pink-Lady_Iconic.jpg"
    index = EdgeIndexSettings(dir=tmp_path / "var" / "index")
    cfg = ApiConfig(environment="development", hook=HookSettings(secret="x" * 40),
                    runtime=RuntimeSettings(model_dir=model_dir), index=index, api=ApiSettings(serving_refresh_s=0.05))
    reg = ModelRegistry(model_dir)
    active = reg.get(reg.active)
    other = reg.get("lite0-imagenet")
    app = api.create_app(config=cfg, producer=InMemoryBus().producer())
    with TestClient(app) as client:
        r = client.post("/v1/search", content=photo.read_bytes())
        assert r.status_code == 200, r.text
        assert r.json()["model_id"] == active.model_id  # first start adopts the active model
        mgr = GenerationManager(index)
        mgr.begin(other.model_id, name=other.name, dim=other.dim)
        time.sleep(0.2)
        r = client.post("/v1/search", content=photo.read_bytes())
        assert r.json()["model_id"] == active.model_id  # building does not serve
        mgr.switch(other.model_id)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            r = client.post("/v1/search", content=photo.read_bytes())
            assert r.status_code == 200
            if r.json()["model_id"] == other.model_id:
                break
            time.sleep(0.1)
        assert r.json()["model_id"] == other.model_id
