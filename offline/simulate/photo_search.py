"""The REAL visual search over the SIMULATED offers: shop photos searched through the production
ingest and query code (``OfferIndexSearch``), for the closed loop and for ``make eval``.

Each offer becomes a ``CatalogItem`` (its image, the simulated price and shop, the marketplace's
``product_group`` key where the offer has one) and goes through ``workers.pipeline.ingest_stream``
into a fresh embedded Edge index, so the near-duplicate links (``duplicate_of``) are the ones
ingest's md5/dHash finds, not the simulator's. A query is a ``SimQuery`` whose ``photo`` is a shop
photo of another split than the offers' images; ``Searcher.search_image`` embeds it, votes the
category, routes and searches exactly as the API does, and the candidates it hands to its re-rank
seam (the pool ``LightGBMReranker`` orders in the API) are the answer, best first.

The index does not change while a loop runs, so one photo's candidates are computed once and
reused for every later search with the same photo (``cache_hits`` counts them). The scores are
the model's cosines: nothing about an offer's quality reaches them.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from index.base import SearchHit as IndexHit
from offline.simulate.catalog import SimOffer
from offline.simulate.shoppers import SimQuery


@dataclass(frozen=True)
class _Passed:
    hits: list[IndexHit]
    ranker: str = "visual"
    fallback_reason: str | None = None
    scores: list[float] | None = None


class _Capture:
    """A ``query.searcher.Reranker`` that keeps the candidates it is given and leaves their order."""

    def __init__(self) -> None:
        self.last: list[IndexHit] = []

    def rerank_with_info(self, hits: list[IndexHit], *, category: str | None = None) -> _Passed:
        self.last = list(hits)
        return _Passed(list(hits))

    def explain(self, hits: list[IndexHit], *, category: str | None = None) -> list:
        return []


def offer_items(offers: Sequence[SimOffer]) -> list:
    """The offers as catalog items, in offer order (offer 0 of a product before its twins)."""
    from events.item import CatalogItem

    return [CatalogItem(item_id=o.item_id, title=str(o.payload()["title"]),
                        category_path=(o.top, o.category, o.product_id.rsplit("/", 1)[-1]),
                        image=o.image, price=o.price, shop=o.shop, product_group=o.product_group)
            for o in offers]


class OfferIndexSearch:
    """``search(query) -> list[SearchHit]`` over an Edge index of ``offers`` (module doc).

    ``root``: the directory the offers' and queries' image files lie under (the fetcher reads
    nothing outside it). ``cfg``: a ``tongkuan.config.ToolConfig`` (fetch, image, worker, search
    settings); ``vision``: the ``VisionPipeline`` (default: the configured runtime's)."""

    def __init__(self, offers: Sequence[SimOffer], root: str | Path, *, cfg=None, vision=None,
                 work_dir: str | Path | None = None):
        from index.factory import open_index
        from index.settings import EdgeIndexSettings
        from query.searcher import Searcher
        from tongkuan.config import ToolConfig, load
        from workers.fetch import ImageFetcher
        from workers.pipeline import ingest_stream

        cfg = cfg or load(ToolConfig)
        if vision is None:
            from vision.runtime import VisionPipeline

            vision = VisionPipeline.from_settings(cfg.runtime)
        self.vision = vision
        self._tmp = None if work_dir is not None else tempfile.mkdtemp(prefix="tongkuan-sim-offers-")
        where = Path(work_dir if work_dir is not None else self._tmp) / "offers"  # type: ignore[arg-type]
        shutil.rmtree(where, ignore_errors=True)
        self.index = open_index(EdgeIndexSettings(dir=where), vision.dim, model_id=vision.model_id)
        self.report = ingest_stream(
            offer_items(offers), index=self.index, embedder=vision,
            fetcher=ImageFetcher.from_settings(cfg.fetch.reading_files_under(Path(root)), cfg.image.max_bytes),
            max_pixels=cfg.image.max_pixels, batch_size=cfg.worker.ingest_batch_size)
        if self.report.failures:
            raise RuntimeError(f"{len(self.report.failures)} offers failed to ingest: {self.report.failures[:3]}")
        self._capture = _Capture()
        self.searcher = Searcher.from_settings(self.index, vision, cfg.search, reranker=self._capture,
                                               max_image_bytes=cfg.image.max_bytes,
                                               max_image_pixels=cfg.image.max_pixels)
        self._cache: dict[str, list[IndexHit]] = {}
        self.cache_hits = 0
        self.model_id = vision.model_id

    @property
    def items(self) -> int:
        return self.index.count()

    def candidates(self, photo: str | Path) -> list[IndexHit]:
        """The re-rank seam's candidates for one shop photo, best visual score first."""
        from vision.decode import load_image

        key = str(photo)
        if key in self._cache:
            self.cache_hits += 1
            return list(self._cache[key])
        self._capture.last = []
        self.searcher.search_image(load_image(Path(photo)), limit=10)
        self._cache[key] = list(self._capture.last)
        return list(self._cache[key])

    def __call__(self, query: SimQuery) -> list[IndexHit]:
        if not query.photo:
            raise ValueError(f"query {query.request_id} has no photo to search with")
        return self.candidates(query.photo)

    def describe(self) -> dict:
        return {"search": "real: Searcher.search_image over an Edge index of the offers (offline.simulate.photo_search)",
                "model_id": self.model_id, "items": self.items, "distinct_photos": len(self._cache),
                "cache_hits": self.cache_hits}

    def close(self) -> None:
        self.index.close()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __enter__(self) -> OfferIndexSearch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["OfferIndexSearch", "offer_items"]
