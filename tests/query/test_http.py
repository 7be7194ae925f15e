"""The query routes on the real vision runtime and embedded index. Bad input → what each gets:
corrupt/empty/non-image body → 422 with the reason code; body over the cap → 413; unknown item id → 404.
(Keys, rate limits, slow bodies and busy slots: ``tests/tongkuan/test_api_security.py``.)"""


import pytest
from fastapi.testclient import TestClient

from events.bus import InMemoryBus
from events.hook import HookSettings
from index.edge import EdgeIndex
from query.access import add_key
from query.searcher import Searcher
from tests.conftest import DATA, grocery_root
from tongkuan.api import create_app
from tongkuan.config import ApiConfig, ApiSettings
from workers.catalog import read_catalog
from workers.fetch import ImageFetcher
from workers.pipeline import ingest_stream

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def client(tmp_path_factory, pipeline):
    root = grocery_root() / "dataset" / "iconic-images-and-descriptions" / "Fruit"
    index = EdgeIndex(tmp_path_factory.mktemp("idx"), pipeline.dim, model_id=pipeline.model_id)
    ingest_stream(read_catalog(root), index=index, embedder=pipeline,
                  fetcher=ImageFetcher(object_root=root, local_refs=True))
    searcher = Searcher(index, pipeline, max_image_bytes=2_000_000)
    keys = tmp_path_factory.mktemp("keys") / "keys.json"
    key = add_key(keys, "test", ["search", "admin"])
    app = create_app(searcher=searcher, producer=InMemoryBus().producer(),
                     config=ApiConfig(hook=HookSettings(secret="x" * 40), api=ApiSettings(keys_file=keys)))
    with TestClient(app, headers={"Authorization": f"Bearer {key}"}) as c:
        yield c
    index.close()


def test_search_finds_the_same_product(client):
    img = DATA / "dataset/iconic-images-and-descriptions/Fruit/Apple/Pink-Lady/Pink-Lady_Iconic.jpg"
    r = client.post("/v1/search?limit=3", content=img.read_bytes(), headers={"content-type": "image/jpeg"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["objects"][0]["hits"][0]["item_id"] == "Apple/Pink-Lady"
    assert len(body["objects"][0]["hits"]) == 3
    assert {"decode", "search"} <= set(body["timings_ms"])


def test_responses_show_object_keys_never_server_paths(client):
    """The finding: ``hits[].image`` was the absolute path of a local item's file."""
    root = grocery_root() / "dataset" / "iconic-images-and-descriptions" / "Fruit"
    img = root / "Apple/Pink-Lady/Pink-Lady_Iconic.jpg"
    hits = client.post("/v1/search?limit=5", content=img.read_bytes()).json()["objects"][0]["hits"]
    hits += client.get("/v1/items/Apple/Pink-Lady/similar?limit=5").json()
    assert hits and all(h["image"] for h in hits)
    for h in hits:
        assert not h["image"].startswith("/") and str(root) not in h["image"] and ".." not in h["image"], h
        assert (root / h["image"]).is_file()  # the key, relative to the object root
    assert hits[0]["image"] == "Apple/Pink-Lady/Pink-Lady_Iconic.jpg"


@pytest.mark.parametrize(("payload", "base", "shown"), [
    ({"image": "https://img.example/a.jpg"}, "", "https://img.example/a.jpg"),
    ({"image": "/srv/objects/a/b.jpg", "image_public": "a/b.jpg"}, "", "a/b.jpg"),
    ({"image": "/srv/objects/a/b.jpg", "image_public": "a/b.jpg"}, "https://cdn.example/o/", "https://cdn.example/o/a/b.jpg"),
    ({"image": "/srv/objects/a/b.jpg"}, "", ""),  # indexed before keys were recorded: nothing shown
    ({"image": "/srv/objects/a/b.jpg", "image_public": "/srv/objects/a/b.jpg"}, "", ""),
    ({"image": "x", "image_public": "../../etc/passwd"}, "", ""),
])
def test_public_image(payload, base, shown):
    from query.searcher import public_image

    assert public_image(payload, base) == shown


@pytest.mark.parametrize(
    "payload,reason",
    [(b"", "empty"), (b"plain text, not a picture", "unsupported"), (b"\xff\xd8\xff\xe0" + b"\0" * 64, "corrupt")],
)
def test_bad_images_get_422_with_reason(client, payload, reason):
    r = client.post("/v1/search", content=payload)
    assert r.status_code == 422
    assert r.json()["reason"] == reason and r.json()["error"] == "unprocessable"


def test_oversized_upload_gets_413(client):
    r = client.post("/v1/search", content=b"\xff\xd8\xff" + b"0" * 2_100_000)
    assert r.status_code == 413


def test_similar_items_and_unknown_id(client):
    r = client.get("/v1/items/Apple/Pink-Lady/similar?limit=2")  # ids may contain slashes
    assert r.status_code == 200, r.text
    hits = r.json()
    assert len(hits) == 2 and all(h["item_id"] != "Apple/Pink-Lady" for h in hits)
    r = client.get("/v1/items/nope/similar")
    assert r.status_code == 404 and r.json()["reason"] == "unknown_item"


def test_metrics_and_health(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/metrics").status_code == 200


def test_search_off_answers_503(tmp_path):
    app = create_app(producer=InMemoryBus().producer(),
                     config=ApiConfig(environment="development", hook=HookSettings(secret="x" * 40),
                                      api=ApiSettings(serve_search=False)))
    with TestClient(app) as c:
        r = c.post("/v1/search", content=b"\xff\xd8\xff")
        assert r.status_code == 503 and "not served by this process" in r.text
        assert c.get("/healthz").status_code == 200
