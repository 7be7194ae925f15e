"""Text and image + text search over the items' title vectors (issue 15 item 5), on the real vision
runtime, the real title encoder (ONNX) and an embedded index of the grocery Fruit catalog.

Bad input: text where the serving generation has no title vectors -> 422 ``text_unsupported``
(tests/query/test_search_api.py); a generation that holds title vectors written without a title
encoder -> the write fails (``TargetWriteError``), never a silent item without its title vector.
"""

from __future__ import annotations

import base64

import numpy as np
import pytest
from fastapi.testclient import TestClient

from events.bus import InMemoryBus
from events.hook import HookSettings
from index.edge import EdgeIndex
from query.access import add_key
from query.models import SearchFilters
from query.searcher import Searcher, TextUnsupportedError
from tests.conftest import grocery_root
from tongkuan.api import create_app
from tongkuan.config import ApiConfig, ApiSettings
from vision.text import TitleEncoder
from workers.catalog import read_catalog
from workers.fetch import ImageFetcher
from workers.pipeline import TargetWriteError, ingest_items, ingest_stream

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

FRUIT = grocery_root() / "dataset" / "iconic-images-and-descriptions" / "Fruit"
PINK = FRUIT / "Apple/Pink-Lady/Pink-Lady_Iconic.jpg"


@pytest.fixture(scope="module")
def titles(model_dir) -> TitleEncoder:
    return TitleEncoder.from_dir(model_dir, threads=1)


@pytest.fixture(scope="module")
def searcher(tmp_path_factory, pipeline, titles):
    index = EdgeIndex(tmp_path_factory.mktemp("idx"), pipeline.dim, text_dim=titles.dim, model_id=pipeline.model_id)
    items = [r for r in read_catalog(FRUIT) if hasattr(r, "item_id")]
    rep = ingest_stream(items, index=index, embedder=pipeline, titles=titles,
                        fetcher=ImageFetcher(object_root=FRUIT, local_refs=True))
    assert len(rep.indexed) == len(items) == 28
    yield Searcher(index, pipeline, text_encoder=titles, max_image_bytes=2_000_000)
    index.close()


def test_text_finds_the_item_by_its_title(searcher):
    for text, want in (("pink lady apple", "Apple/Pink-Lady"), ("granny smith", "Apple/Granny-Smith"),
                       ("banana", "Banana")):
        resp = searcher.search_text(text, limit=3)
        obj = resp.objects[0]
        assert obj.box is None and not obj.no_match and resp.image_size is None
        assert obj.hits[0].item_id == want, (text, [h.item_id for h in obj.hits])


def test_text_search_keeps_to_the_filters(searcher):
    hits = searcher.search_text("banana", limit=5, filters=SearchFilters(category="Apple")).hits
    assert len(hits) == 5 and all(h.category_path[0] == "Apple" for h in hits)
    hits = searcher.search_text("apple", limit=5, filters=SearchFilters(category="Apple/Royal-Gala")).hits
    assert [h.item_id for h in hits] == ["Apple/Royal-Gala"]


def test_image_and_text_fuse_both_cosines_exactly(searcher):
    w = searcher.hybrid_image_weight
    resp = searcher.search_bytes(PINK.read_bytes(), limit=8, text="pink lady apple")
    hits = resp.hits
    assert hits[0].item_id == "Apple/Pink-Lady"
    for h in hits:  # every candidate has both scores (the missing side asked for by id), fused as documented
        assert h.image_score is not None and h.text_score is not None
        assert h.score == pytest.approx(w * h.image_score + (1 - w) * h.text_score, abs=1e-5)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    # the image part is the image search's own cosine
    alone = {h.item_id: h.score for h in searcher.search_bytes(PINK.read_bytes(), limit=8).hits}
    assert hits[0].image_score == pytest.approx(alone["Apple/Pink-Lady"], abs=1e-5)
    # the text moves up an item the image alone ranks lower (within the shard the image vote routes to)
    image_rank = [h.item_id for h in searcher.search_bytes(PINK.read_bytes(), limit=28).hits]
    text_rank = [h.item_id for h in searcher.search_bytes(PINK.read_bytes(), limit=28, text="granny smith").hits]
    assert text_rank.index("Apple/Granny-Smith") < image_rank.index("Apple/Granny-Smith")


def test_text_needs_title_vectors(tmp_path, pipeline, titles):
    plain = EdgeIndex(tmp_path / "plain", pipeline.dim, model_id=pipeline.model_id)
    try:
        with pytest.raises(TextUnsupportedError):
            Searcher(plain, pipeline, text_encoder=titles).search_text("banana")
        with pytest.raises(TextUnsupportedError):
            Searcher(plain, pipeline).search_bytes(PINK.read_bytes(), text="banana")
    finally:
        plain.close()


def test_a_generation_with_title_vectors_refuses_writes_without_its_encoder(tmp_path, pipeline, titles):
    index = EdgeIndex(tmp_path / "titled", pipeline.dim, text_dim=titles.dim, model_id=pipeline.model_id)
    items = [r for r in read_catalog(FRUIT) if hasattr(r, "item_id")][:2]
    fetcher = ImageFetcher(object_root=FRUIT, local_refs=True)
    try:
        with pytest.raises(TargetWriteError, match="no title encoder"):
            ingest_items(items, index=index, embedder=pipeline, fetcher=fetcher)
        assert index.count() == 0
        ingest_items(items, index=index, embedder=pipeline, fetcher=fetcher, titles=titles)
        vec = titles.encode([items[1].title])[0]
        assert index.search(vec, limit=1, using="title")[0].item_id == items[1].item_id
        assert np.isclose(index.search(vec, limit=1, using="title")[0].score, 1.0, atol=1e-4)
    finally:
        index.close()


@pytest.fixture(scope="module")
def client(searcher, tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "keys.json"
    key = add_key(keys, "test", ["search"])
    app = create_app(searcher=searcher, producer=InMemoryBus().producer(),
                     config=ApiConfig(hook=HookSettings(secret="x" * 40), api=ApiSettings(keys_file=keys)))
    with TestClient(app, headers={"Authorization": f"Bearer {key}"}) as c:
        yield c


def test_the_api_serves_text_alone_and_image_with_text(client):
    r = client.post("/v1/search", json={"text": "pink lady apple", "limit": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["objects"][0]["box"] is None and body["objects"][0]["hits"][0]["item_id"] == "Apple/Pink-Lady"
    r = client.post("/v1/search", json={"image_base64": base64.b64encode(PINK.read_bytes()).decode(),
                                        "text": "pink lady apple", "limit": 3})
    assert r.status_code == 200, r.text
    hit = r.json()["objects"][0]["hits"][0]
    assert hit["item_id"] == "Apple/Pink-Lady" and hit["text_score"] is not None
    r = client.post("/v1/search", files={"image": ("p.jpg", PINK.read_bytes(), "image/jpeg")},
                    data={"text": "pink lady apple"})
    assert r.status_code == 200 and r.json()["objects"][0]["hits"][0]["text_score"] is not None
    r = client.post("/v1/search", json={"text": "   "})  # blank text and no image: nothing to search
    assert r.status_code == 422 and r.json()["reason"] == "invalid_request"
