"""The searcher's re-rank seam: the re-ranker gets the visual candidates and the predicted category,
its order and its name reach the response, a fallback says why, ``explain`` carries the per-feature
contributions, and image + text / text queries stay in their own order (the model was trained on
image cosines). On the real vision runtime and an embedded index of the grocery Fruit catalog."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from index.edge import EdgeIndex
from query.searcher import Searcher
from rerank.features import InMemoryFeatureReader
from rerank.reranker import FALLBACK, LightGBMReranker
from tests.conftest import grocery_root
from vision.text import TitleEncoder
from workers.catalog import read_catalog
from workers.fetch import ImageFetcher
from workers.pipeline import ingest_stream

FRUIT = grocery_root() / "dataset" / "iconic-images-and-descriptions" / "Fruit"
PINK = FRUIT / "Apple/Pink-Lady/Pink-Lady_Iconic.jpg"


@dataclass
class Outcome:
    hits: list
    ranker: str
    fallback_reason: str | None


@dataclass
class Explanation:
    item_id: str
    contributions: dict


class Reverse:
    """A re-ranker that puts the visual order upside down (so its effect cannot be missed)."""

    def __init__(self):
        self.calls: list[tuple[int, str | None]] = []

    def rerank_with_info(self, hits, *, category=None):
        self.calls.append((len(hits), category))
        return Outcome(list(reversed(hits)), "reverse:v1", None)

    def explain(self, hits, *, category=None):
        return [Explanation(h.item_id, {"visual_score": -1.0}) for h in hits]


@pytest.fixture(scope="module")
def index(tmp_path_factory, pipeline, model_dir):
    titles = TitleEncoder.from_dir(model_dir, threads=1)
    ix = EdgeIndex(tmp_path_factory.mktemp("idx"), pipeline.dim, text_dim=titles.dim, model_id=pipeline.model_id)
    ingest_stream(list(read_catalog(FRUIT)), index=ix, embedder=pipeline, titles=titles,
                  fetcher=ImageFetcher(object_root=FRUIT, local_refs=True))
    yield ix, titles
    ix.close()


def test_the_reranker_orders_the_hits_and_is_named(index, pipeline):
    ix, titles = index
    visual = Searcher(ix, pipeline).search_bytes(PINK.read_bytes(), limit=5)
    reverse = Reverse()
    searcher = Searcher(ix, pipeline, reranker=reverse, candidate_k=8, text_encoder=titles)
    resp = searcher.search_bytes(PINK.read_bytes(), limit=5)
    # routed to the Apple shard (its five apples), with the voted category, the payload's "category"
    # level (the catalog is rooted at Fruit/: [kind, variety], so the variety)
    assert reverse.calls == [(5, "Pink-Lady")]
    assert resp.ranker == resp.objects[0].ranker == "reverse:v1" and resp.objects[0].ranker_fallback is None
    assert [h.item_id for h in resp.hits] == [h.item_id for h in reversed(visual.hits)]
    assert all(h.contributions is None for h in resp.hits)
    explained = searcher.search_bytes(PINK.read_bytes(), limit=5, explain=True)
    assert all(h.contributions == {"visual_score": -1.0} for h in explained.hits)
    # image + text and text alone: not re-ranked (fused / title scores are not the model's input)
    hybrid = searcher.search_bytes(PINK.read_bytes(), limit=5, text="pink lady apple")
    text = searcher.search_text("pink lady apple", limit=5)
    assert hybrid.ranker == text.ranker == "visual" and len(reverse.calls) == 2
    assert hybrid.hits[0].item_id == text.hits[0].item_id == "Apple/Pink-Lady"


def test_without_a_model_the_reranker_falls_back_to_visual_order_and_says_so(index, pipeline, tmp_path):
    from rerank.registry import ModelRegistry

    ix, _ = index
    visual = Searcher(ix, pipeline).search_bytes(PINK.read_bytes(), limit=5)
    reranker = LightGBMReranker(InMemoryFeatureReader(), store_features=("ctr_7d",),
                                registry=ModelRegistry(tmp_path / "models"))
    resp = Searcher(ix, pipeline, reranker=reranker).search_bytes(PINK.read_bytes(), limit=5)
    assert resp.ranker == FALLBACK and resp.objects[0].ranker_fallback == "no_model"
    assert [h.item_id for h in resp.hits] == [h.item_id for h in visual.hits]
