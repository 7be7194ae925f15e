"""In-process query pipeline: decode → localize+embed → category vote → shard search → collapse
near duplicates → (re-rank) → response. The HTTP service and the CLI both call ``Searcher``.
Text queries search the items' title vectors (``search_text``); an image with text fuses the main
product's image and title candidates (``_fuse``: a weighted sum of both cosines).

Shard policy (分库检索): the category vote picks the top-level shard; when its probability is at least
``shard_min_confidence`` only that shard's candidates are kept, otherwise every shard is searched
(scatter-gather), so a doubtful vote never hides the right shard.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Protocol

import numpy as np
from PIL import Image

from index.base import ITEM_ID_KEY, TITLE_VECTOR, Range, VectorIndex
from index.base import SearchHit as IndexHit
from query.category import DEFAULT_K, DEFAULT_TEMPERATURE, CategoryPrediction, predict_category
from query.metrics import NO_MATCH, QUERY_ERRORS, QUERY_STAGE_SECONDS
from query.models import CategoryOut, ItemOut, ObjectResult, SearchFilters, SearchHit, SearchResponse
from query.settings import SearchSettings
from vision.decode import ImageError, decode_image


class QueryEmbedder(Protocol):
    model_id: str

    def embed_query(self, image: Image.Image, *, max_regions: int = 3, multi_object: bool = False): ...


class RerankOutcome(Protocol):
    hits: list[IndexHit]
    ranker: str  # what ordered them: a model version, or "visual-fallback"
    fallback_reason: str | None  # why the model did not (no_model, features_unavailable, error)


class Reranker(Protocol):
    """Re-orders visual candidates (``rerank.LightGBMReranker``): offers of the right product first,
    by quality. ``category``: the query's predicted category (a feature)."""

    def rerank_with_info(self, hits: list[IndexHit], *, category: str | None = None) -> RerankOutcome: ...

    def explain(self, hits: list[IndexHit], *, category: str | None = None) -> list: ...


class UnknownItemError(KeyError):
    pass


class TextUnsupportedError(RuntimeError):
    """A text query where the serving generation has no title vectors (or no text model loaded)."""


class TextEncoder(Protocol):
    """Text -> L2-normalised vectors (``vision.text.TitleEncoder``)."""

    def encode(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray: ...


# Payload key written at ingest (workers.pipeline): every prefix of the item's category path, parts
# joined by "/", so a category filter is one exact match inside the index.
CATEGORY_PREFIXES_KEY = "category_prefixes"


def restriction(filters: SearchFilters | None) -> tuple[list[str] | None, dict | None]:
    """``filters`` as (shards, where) for the index: the top-level category is the shard, a deeper
    prefix and the shops are payload matches, the price a range."""
    if filters is None:
        return None, None
    where: dict = {}
    parts = filters.category_parts
    shards = [parts[0]] if parts else None
    if len(parts) > 1:
        where[CATEGORY_PREFIXES_KEY] = "/".join(parts)
    if filters.shop:
        where["shop"] = list(filters.shop)
    if filters.price_min is not None or filters.price_max is not None:
        where["price"] = Range(gte=filters.price_min, lte=filters.price_max)
    if filters.in_stock:
        where["in_stock"] = 1
    return shards, where or None


class Searcher:
    def __init__(
        self,
        index: VectorIndex,
        embedder: QueryEmbedder,
        *,
        candidate_k: int = 60,
        category_k: int = DEFAULT_K,
        category_temperature: float = DEFAULT_TEMPERATURE,
        shard_min_confidence: float = 0.6,
        classifier_weight: float = 0.5,
        reranker: Reranker | None = None,
        max_image_bytes: int = 20 * 1024 * 1024,
        max_image_pixels: int = 40_000_000,
        image_base_url: str = "",
        no_match_below: float | None = None,
        text_encoder: TextEncoder | None = None,
        hybrid_image_weight: float = 0.6,
    ):
        self.index = index
        self.text_encoder = text_encoder
        self.hybrid_image_weight = hybrid_image_weight
        self.embedder = embedder
        self.candidate_k = candidate_k
        self.category_k = category_k
        self.category_temperature = category_temperature
        self.shard_min_confidence = shard_min_confidence
        self.classifier_weight = classifier_weight
        self.reranker = reranker
        self.max_image_bytes = max_image_bytes
        self.max_image_pixels = max_image_pixels
        self.image_base_url = image_base_url
        self.no_match_below = no_match_below

    @classmethod
    def from_settings(cls, index: VectorIndex, embedder: QueryEmbedder, search: SearchSettings, *,
                      max_image_bytes: int = 20 * 1024 * 1024, max_image_pixels: int = 40_000_000,
                      reranker: Reranker | None = None, text_encoder: TextEncoder | None = None) -> Searcher:
        return cls(index, embedder, candidate_k=search.candidate_k, category_k=search.category_k,
                   category_temperature=search.category_temperature, shard_min_confidence=search.shard_min_confidence, classifier_weight=search.classifier_weight,
                   reranker=reranker, max_image_bytes=max_image_bytes, max_image_pixels=max_image_pixels,
                   image_base_url=search.image_base_url, no_match_below=search.no_match_below,
                   text_encoder=text_encoder, hybrid_image_weight=search.hybrid_image_weight)

    @property
    def serves_text(self) -> bool:
        """Text and image + text queries need the title encoder and an index with title vectors."""
        return self.text_encoder is not None and bool(self.index.text_dim)

    def _text_vector(self, text: str) -> np.ndarray:
        if not self.serves_text:
            raise TextUnsupportedError("this generation holds no title vectors (no text model when it was "
                                       "built); re-embed with the text model to serve text queries")
        t0 = time.perf_counter()
        vec = self.text_encoder.encode([text])[0]  # type: ignore[union-attr]
        QUERY_STAGE_SECONDS.labels("embed_text").observe(time.perf_counter() - t0)
        return vec

    # -- entry points -------------------------------------------------------------------------
    def search_bytes(self, data: bytes, **kw) -> SearchResponse:
        t0 = time.perf_counter()
        try:
            image = decode_image(data, max_bytes=self.max_image_bytes, max_pixels=self.max_image_pixels)
        except ImageError as e:
            QUERY_ERRORS.labels(e.reason).inc()
            raise
        QUERY_STAGE_SECONDS.labels("decode").observe(time.perf_counter() - t0)
        decode_ms = (time.perf_counter() - t0) * 1000
        resp = self.search_image(image, **kw)
        resp.timings_ms = {"decode": decode_ms, **resp.timings_ms}
        return resp

    def search_image(
        self,
        image: Image.Image,
        *,
        limit: int = 10,
        max_objects: int = 1,
        shards: Sequence[str] | None = None,
        filters: SearchFilters | None = None,
        text: str | None = None,
        explain: bool = False,
    ) -> SearchResponse:
        """Search every product region of ``image``; with ``text``, the main product's candidates
        are fused with the title search (``hybrid_image_weight``). ``explain``: each hit the
        re-ranker ordered carries its per-feature contributions."""
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        text_vec = None
        if text is not None and text.strip():
            text_vec = self._text_vector(text)
            timings["embed_text"] = (time.perf_counter() - t0) * 1000
            t0 = time.perf_counter()
        # One extra region: when the main product is a crop, the full photo comes next and both
        # views score the main product (max similarity; +1.4 to +4 points R@1 on val, offline.tune).
        # Several products: one region each from the localizer's product split, the full photo
        # second as the main product's other view (val 2x2 mosaics: per-product R@1 0.24 -> 0.73).
        multi = max_objects > 1
        views = 1 if multi or getattr(self.embedder, "crops_queries", True) else 0
        q = self.embedder.embed_query(image, max_regions=max_objects + views,
                                      **({"multi_object": True} if multi else {}))
        stages = getattr(self.embedder, "timings", None) or {"localize+embed": time.perf_counter() - t0}
        for stage, seconds in stages.items():
            timings[stage] = seconds * 1000
            QUERY_STAGE_SECONDS.labels(stage).observe(seconds)
        filter_shards, where = restriction(filters)
        if filter_shards is not None:
            shards = filter_shards if shards is None else [s for s in shards if s in filter_shards]
        objects = []
        search_ms = 0.0
        for n, rows in enumerate(_object_groups(q.regions, image.size)[:max_objects]):
            t1 = time.perf_counter()
            # The classifier head sees the whole photo: it speaks for the main product only.
            probs = getattr(q, "category_probs", None) if n == 0 else None
            pred, hits, top_image, ranked = self._search_product(
                q.vectors[rows], limit=limit, shards=shards, classifier=probs, where=where,
                text_vector=text_vec if n == 0 else None, explain=explain)
            search_ms += (time.perf_counter() - t1) * 1000
            region = q.regions[rows[0]]
            # The threshold was calibrated on image cosines: a hybrid query is judged by its image part.
            no_match = not hits or (self.no_match_below is not None and top_image < self.no_match_below)
            if no_match:
                NO_MATCH.inc()
            objects.append(
                ObjectResult(
                    box=tuple(int(v) for v in region.box),
                    region_score=float(region.score),
                    category=pred,
                    no_match=no_match,
                    hits=hits,
                    ranker=ranked[0],
                    ranker_fallback=ranked[1],
                )
            )
        timings["search"] = search_ms
        QUERY_STAGE_SECONDS.labels("search").observe(search_ms / 1000)
        return SearchResponse(model_id=self.embedder.model_id, image_size=image.size, objects=objects,
                              ranker=objects[0].ranker if objects else "visual", timings_ms=timings)

    def search_text(self, text: str, *, limit: int = 10, filters: SearchFilters | None = None) -> SearchResponse:
        """Search the items' title vectors with ``text`` (scatter-gather over the filters' shards; the
        title neighbours' category vote is reported, not used to route). No ``no_match``: the
        threshold is an image one; an empty result only where nothing matches the filters."""
        t0 = time.perf_counter()
        vec = self._text_vector(text)
        timings = {"embed_text": (time.perf_counter() - t0) * 1000}
        t1 = time.perf_counter()
        shards, where = restriction(filters)
        k = max(self.candidate_k, self.category_k, limit)
        raw = self.index.search(vec, limit=k, shards=shards, where=where, using=TITLE_VECTOR)
        pred = predict_category(raw, k=self.category_k, temperature=self.category_temperature)
        searched = sorted({h.shard for h in raw}) if shards is None else list(shards)
        timings["search"] = (time.perf_counter() - t1) * 1000
        QUERY_STAGE_SECONDS.labels("search").observe(timings["search"] / 1000)
        hits = _collapse(raw, self.image_base_url)[:limit]
        if not hits:
            NO_MATCH.inc()
        obj = ObjectResult(box=None, region_score=1.0, category=_category_out(pred, searched, False),
                           no_match=not hits, hits=hits)
        # in title order: the re-ranker was trained on image cosines (docs/rerank.md)
        return SearchResponse(model_id=self.embedder.model_id, objects=[obj], timings_ms=timings, ranker="visual")

    def category_inputs(self, image: Image.Image, *, k: int) -> tuple[list[IndexHit], dict[str, float] | None]:
        """What the category prediction of ``image``'s main product sees, before any routing: its
        ``k`` nearest neighbours over every shard and the classifier head's probabilities (None for a
        model without one). For calibrating the fusion offline (``offline.fusion``)."""
        views = 0 if not getattr(self.embedder, "crops_queries", True) else 1
        q = self.embedder.embed_query(image, max_regions=1 + views)
        rows = _object_groups(q.regions, image.size)[0]
        return self._search_max(q.vectors[rows], k, None), getattr(q, "category_probs", None)

    def item(self, item_id: str) -> ItemOut:
        recs = self.index.retrieve([item_id])
        if not recs:
            raise UnknownItemError(item_id)
        p = recs[0].payload
        return ItemOut(item_id=item_id, title=str(p.get("title", "")), category_path=list(p.get("category_path", [])),
                       image=public_image(p, self.image_base_url), price=p.get("price"), shop=p.get("shop"),
                       version=recs[0].version, duplicate_of=p.get("duplicate_of"), model_id=str(p.get("model_id", "")),
                       indexed_at=p.get("indexed_at"))

    def similar_items(self, item_id: str, *, limit: int = 10) -> list[SearchHit]:
        """Items visually similar to an indexed item (for recommenders): ``similar_to``."""
        return similar_to(self.index, item_id, limit=limit, base_url=self.image_base_url)

    # -- the core -----------------------------------------------------------------------------
    def _search_max(self, vectors: np.ndarray, k: int, shards: Sequence[str] | None,
                    where: dict | None = None) -> list[IndexHit]:
        if len(vectors) == 1:
            return self.index.search(vectors[0], limit=k, shards=shards, where=where)
        best: dict[str, IndexHit] = {}
        for hits in self.index.search_batch(vectors, limit=k, shards=shards, where=where):
            for h in hits:
                if h.item_id not in best or h.score > best[h.item_id].score:
                    best[h.item_id] = h
        return sorted(best.values(), key=lambda h: -h.score)[:k]

    def search_vector(
        self, vector: np.ndarray, *, limit: int = 10, shards: Sequence[str] | None = None
    ) -> tuple[CategoryOut | None, list[SearchHit]]:
        return self.search_vectors(vector[None, :], limit=limit, shards=shards)

    def search_vectors(
        self,
        vectors: np.ndarray,
        *,
        limit: int = 10,
        shards: Sequence[str] | None = None,
        classifier: dict[str, float] | None = None,
        where: dict | None = None,
    ) -> tuple[CategoryOut | None, list[SearchHit]]:
        """Search with one or more views of one product; a candidate scores its best view.
        ``classifier``: coarse category -> probability, fused with the neighbours' vote. ``where``:
        payload matches applied inside the index (``restriction``)."""
        pred, hits, _, _ = self._search_product(vectors, limit=limit, shards=shards, classifier=classifier,
                                                where=where)
        return pred, hits

    def _search_product(
        self,
        vectors: np.ndarray,
        *,
        limit: int,
        shards: Sequence[str] | None,
        classifier: dict[str, float] | None = None,
        where: dict | None = None,
        text_vector: np.ndarray | None = None,
        explain: bool = False,
    ) -> tuple[CategoryOut | None, list[SearchHit], float, tuple[str, str | None]]:
        """``search_vectors``, with the title search fused in where ``text_vector`` is given; also
        the best image cosine among the candidates (what the no-match threshold judges) and what
        ordered the hits: (ranker, fallback reason)."""
        k = max(self.candidate_k, self.category_k, limit)
        raw = self._search_max(vectors, k, shards, where)
        pred = predict_category(raw, k=self.category_k, temperature=self.category_temperature, classifier=classifier,
                                alpha=self.classifier_weight)
        searched = sorted({h.shard for h in raw}) if shards is None else list(shards)
        routed = False
        if pred is not None and shards is None and pred.shard_confidence >= self.shard_min_confidence:
            in_shard = [h for h in raw if h.shard == pred.shard]
            if len(in_shard) < min(limit, self.candidate_k):
                in_shard = self._search_max(vectors, self.candidate_k, [pred.shard], where)
            raw = in_shard
            searched = [pred.shard]
            routed = True
        top_image = max((h.score for h in raw), default=-1.0)
        scores: dict[str, tuple[float, float]] = {}
        ranked: tuple[str, str | None] = ("visual", None)
        contributions: dict[str, dict[str, float]] = {}
        if text_vector is not None:
            # fused scores are not what the re-ranker was trained on: image + text stays in fused order
            raw, scores = self._fuse(vectors, text_vector, raw, k, [pred.shard] if routed else shards, where)
        elif self.reranker is not None and raw:
            t0 = time.perf_counter()
            category = pred.category if pred is not None else None
            outcome = self.reranker.rerank_with_info(raw, category=category)
            raw, ranked = list(outcome.hits), (outcome.ranker, outcome.fallback_reason)
            if explain and outcome.fallback_reason is None:
                contributions = {e.item_id: e.contributions for e in self.reranker.explain(raw, category=category)}
            QUERY_STAGE_SECONDS.labels("rerank").observe(time.perf_counter() - t0)
        hits = _collapse(raw, self.image_base_url)[:limit]
        for h in hits:
            if h.item_id in scores:
                h.image_score, h.text_score = scores[h.item_id]
            h.contributions = contributions.get(h.item_id)
        return _category_out(pred, searched, routed), hits, top_image, ranked

    def _fuse(self, vectors: np.ndarray, text_vector: np.ndarray, image_hits: list[IndexHit], k: int,
              shards: Sequence[str] | None, where: dict | None) -> tuple[list[IndexHit], dict[str, tuple[float, float]]]:
        """Image + title: the union of both candidate lists, each candidate scored
        ``w * image + (1 - w) * title`` with both cosines exact (the side a candidate was not found
        on is asked for by id, inside the same shards and filters); no title vector scores 0."""
        w = self.hybrid_image_weight
        image = {h.item_id: h for h in image_hits}
        text_hits = self.index.search(text_vector, limit=k, shards=shards, where=where, using=TITLE_VECTOR)
        title = {h.item_id: h.score for h in text_hits}

        def only(ids: list[str]) -> dict:
            return {**(where or {}), ITEM_ID_KEY: ids}

        need_title = [i for i in image if i not in title]
        if need_title:
            for h in self.index.search(text_vector, limit=len(need_title), shards=shards, where=only(need_title),
                                       using=TITLE_VECTOR):
                title[h.item_id] = h.score
        need_image = [h.item_id for h in text_hits if h.item_id not in image]
        if need_image:
            for h in self._search_max(vectors, len(need_image), shards, only(need_image)):
                image[h.item_id] = h
        scores = {i: (h.score, title.get(i, 0.0)) for i, h in image.items()}
        fused = [replace(h, score=w * h.score + (1 - w) * scores[i][1]) for i, h in image.items()]
        return sorted(fused, key=lambda h: -h.score), scores


def similar_to(index: VectorIndex, item_id: str, *, limit: int = 10, base_url: str = "") -> list[SearchHit]:
    """Items visually similar to ``item_id`` in its shard (category), best first: the item itself and
    its near duplicates (the listings of its ``duplicate_of`` group) left out, the rest collapsed."""
    recs = index.retrieve([item_id], with_vectors=True)
    if not recs or recs[0].vector is None:
        raise UnknownItemError(item_id)
    rec = recs[0]
    group = str(rec.payload.get("duplicate_of") or item_id)
    # Near duplicates come first and would eat the limit: ask for more, drop them, collapse the rest.
    raw = index.search(rec.vector, limit=max(limit * 2, limit + 10), shards=[rec.shard])
    hits = [h for h in raw if h.item_id not in (item_id, group) and h.payload.get("duplicate_of") != group]
    return _collapse(hits, base_url)[:limit]


def _object_groups(regions, size: tuple[int, int]) -> list[list[int]]:
    """Rows of the query vectors per product: the main region together with the full photo when the
    main region is a crop (the full photo follows it), then every other region on its own."""
    full = (0, 0, size[0], size[1])
    boxes = [tuple(int(v) for v in r.box) for r in regions]
    if len(boxes) > 1 and boxes[0] != full and boxes[1] == full:
        return [[0, 1], *[[i] for i in range(2, len(boxes))]]
    return [[i] for i in range(len(boxes))]


def _category_out(pred: CategoryPrediction | None, searched: list[str], routed: bool) -> CategoryOut | None:
    if pred is None:
        return None
    return CategoryOut(
        shard=pred.shard, category=pred.category, confidence=pred.confidence, searched_shards=searched,
        routed=routed,
    )


def public_image(payload: dict, base_url: str = "") -> str:
    """What a response may show of an item's image: an http(s) URL as it is; an object key (a path
    relative to the object root, recorded at ingest) joined to ``base_url`` where one is set; never
    a server path (an item indexed before keys were recorded shows none)."""
    ref = str(payload.get("image", ""))
    if ref.startswith(("http://", "https://")):
        return ref
    key = str(payload.get("image_public", ""))
    if not key or key.startswith("/") or ".." in key.split("/"):
        return ""
    return f"{base_url.rstrip('/')}/{key}" if base_url else key


def _collapse(hits: Sequence[IndexHit], base_url: str = "") -> list[SearchHit]:
    """Fold near-duplicate listings (``duplicate_of`` links made at ingest) into the first of their group."""
    out: list[SearchHit] = []
    by_group: dict[str, SearchHit] = {}
    for h in hits:
        group = str(h.payload.get("duplicate_of") or h.item_id)
        if group in by_group:
            by_group[group].duplicates.append(h.item_id)
            continue
        hit = SearchHit(
            item_id=h.item_id,
            score=float(h.score),
            title=str(h.payload.get("title", "")),
            category_path=list(h.payload.get("category_path", [])),
            image=public_image(h.payload, base_url),
            price=h.payload.get("price"),
            shop=h.payload.get("shop"),
            in_stock=bool(h.payload["in_stock"]) if "in_stock" in h.payload else None,
        )
        by_group[group] = hit
        # A twin's original may come later in the list: register under its own id as well.
        by_group.setdefault(h.item_id, hit)
        out.append(hit)
    return out
