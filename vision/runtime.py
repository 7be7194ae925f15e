"""``VisionPipeline``: the one facade the catalog workers and the query service use for vision.

    pipe = VisionPipeline.from_settings(settings)      # resolves + checksum-verifies the model
    vecs = pipe.embed_catalog(images)                 # (N, dim) float32, L2-normalised
    q = pipe.embed_query(photo, max_regions=3)        # q.vectors (R, dim), q.regions, main first
    pipe.timings                                      # {"localize": s, "embed": s} of the last call

Everything that decides what a vector means (pooling, input size, scales, crop policy) comes from the
model's registry entry, so ``model_id`` (stored with every indexed vector) pins it. Query regions:
the main region first, then (when the main one is a crop) the full image, then other candidates.
Scoring a product by the max similarity over the query's vectors is what ``offline.tune`` measured as
``query=full+crop``. With ``multi_object=True`` (a search for several products) the regions are one
per product (``Localizer.localize_products``): the main product first with the full photo as its
second view, then the other products, whatever the entry's crop policy.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from vision.embedder import OnnxEmbedder, l2_normalize
from vision.localize import Localizer, Region, SaliencyLocalizer, full_region
from vision.preprocess import preprocess
from vision.registry import ModelEntry, ModelRegistry

__all__ = ["QueryEmbedding", "StageTimer", "VisionPipeline"]


@dataclass(frozen=True)
class QueryEmbedding:
    vectors: np.ndarray  # (R, dim) float32, L2-normalised; vectors[0] is the main region
    regions: list[Region]  # same order as vectors
    model_id: str
    # Coarse category -> probability from the model's classifier head on the full photo (None when
    # the model has no head); the query side fuses it with the neighbours' vote.
    category_probs: dict[str, float] | None = None

    @property
    def main(self) -> np.ndarray:
        return self.vectors[0]


class StageTimer:
    """Per-stage wall time of the calling thread's last call (``last``) and running totals over all
    threads (``totals``, ``counts``). Safe to share: one pipeline serves concurrent requests."""

    def __init__(self) -> None:
        self._local = threading.local()
        self._lock = threading.Lock()
        self.totals: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    @property
    def last(self) -> dict[str, float]:
        if not hasattr(self._local, "last"):
            self._local.last = {}
        return self._local.last

    def reset_last(self) -> None:
        self._local.last = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            dt = time.perf_counter() - t0
            last = self.last
            last[name] = last.get(name, 0.0) + dt
            with self._lock:
                self.totals[name] = self.totals.get(name, 0.0) + dt
                self.counts[name] = self.counts.get(name, 0) + 1


class VisionPipeline:
    def __init__(self, entry: ModelEntry, embedder: OnnxEmbedder, localizer: Localizer | None = None):
        if embedder.dim != entry.dim:
            raise ValueError(
                f"{embedder.path} outputs {embedder.dim}-d embeddings, registry says {entry.dim}"
            )
        self.entry = entry
        self.embedder = embedder
        self.model_id: str = entry.model_id
        self.dim: int = entry.dim
        self.preprocessing = entry.preprocessing
        self._saliency = SaliencyLocalizer(self._features)
        # A custom localizer (e.g. OnnxDetectorLocalizer) replaces SCDA on the query side.
        self.localizer: Localizer = localizer or self._saliency
        self.stage_timer = StageTimer()

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def from_registry(
        cls,
        model_dir: str | Path,
        name: str = "",
        *,
        threads: int = 0,
        localizer: Localizer | None = None,
        spinning: bool = True,
    ) -> VisionPipeline:
        entry, path = ModelRegistry(model_dir).resolve(name)
        return cls(entry, OnnxEmbedder(path, threads=threads, spinning=spinning), localizer)

    @classmethod
    def from_settings(cls, settings, *, localizer: Localizer | None = None) -> VisionPipeline:
        """``settings``: ``vision.settings.RuntimeSettings`` (model_dir, model, ort_threads, ort_spinning)."""
        return cls.from_registry(
            settings.model_dir, settings.model, threads=settings.ort_threads, localizer=localizer,
            spinning=settings.ort_spinning,
        )

    @property
    def classifies(self) -> bool:
        """Whether the model has a coarse-category head with named classes."""
        return self.embedder.has_coarse and bool(self.entry.classes.get("coarse"))

    @property
    def crops_queries(self) -> bool:
        """Whether the main query region is a crop (then the full photo is a second view of it)."""
        return self.entry.crop.query != "none"

    @property
    def timings(self) -> dict[str, float]:
        return dict(self.stage_timer.last)

    # -- building blocks -------------------------------------------------------------------------
    def _features(self, image: Image.Image) -> np.ndarray:
        f, _ = self.embedder.run(preprocess([image], self.preprocessing))
        return f[0]

    def embed_images(self, images: Sequence[Image.Image], batch_size: int = 32) -> np.ndarray:
        """Whole images as given (no localization), averaged over the entry's scales."""
        if len(images) == 0:
            return np.zeros((0, self.dim), np.float32)
        total = None
        for size in self.entry.all_sizes:
            v = self.embedder.embed_images(images, self.preprocessing.with_size(size), batch_size=batch_size)
            total = v if total is None else total + v
        return l2_normalize(total)

    def localize(self, image: Image.Image) -> list[Region]:
        return self.localizer.localize(image)

    # -- the facade ------------------------------------------------------------------------------
    def _main_box(self, fmap: np.ndarray, image: Image.Image) -> Region:
        return self._saliency.from_features(fmap, image.size)[0]

    def embed_catalog(self, images: Sequence[Image.Image], batch_size: int = 32) -> np.ndarray:
        """Catalog images -> (N, dim) float32, L2-normalised; cropped to the main object when the
        entry's ``crop.catalog`` is ``saliency``.

        With several scales the main object is found at each scale (on that scale's feature map)
        and that crop is embedded at that scale — exactly what ``offline.tune`` measured; localizing
        once at the first scale only cost ~0.02 R@1 on val (vision/README.md)."""
        self.stage_timer.reset_last()
        if self.entry.crop.catalog == "none":
            with self.stage_timer.stage("embed"):
                return self.embed_images(images, batch_size)
        total = np.zeros((len(images), self.dim), np.float32)
        margin = self.entry.crop.margin
        for size in self.entry.all_sizes:
            cfg = self.preprocessing.with_size(size)
            for i in range(0, len(images), batch_size):
                batch = list(images[i : i + batch_size])
                with self.stage_timer.stage("localize"):
                    f, _ = self.embedder.run(preprocess(batch, cfg))
                    crops = [
                        self._main_box(fm, img).crop(img, margin) for fm, img in zip(f, batch, strict=True)
                    ]
                with self.stage_timer.stage("embed"):
                    total[i : i + len(batch)] += self.embedder.run(preprocess(crops, cfg), features=False)[1]
        return l2_normalize(total)

    def catalog_tensors(self, images: Sequence[Image.Image]) -> list[np.ndarray] | None:
        """The model inputs of some catalog images (one array per scale), or None when the entry
        crops catalog images (the crop needs a model pass first). Pure CPU work, safe on any
        thread: the ingest pipeline's concurrent streams each pre-process their own chunk.
        (Pre-processing the next batch on a helper thread while ORT runs this one was no faster
        for one long ``embed_catalog`` call: medians 112.8 vs 109.6 images/s serial over three
        alternating runs, within noise; so ``embed_catalog`` stays a plain loop.)"""
        if self.entry.crop.catalog != "none":
            return None
        return [preprocess(images, self.preprocessing.with_size(size)) for size in self.entry.all_sizes]

    def embed_catalog_tensors(self, tensors: Sequence[np.ndarray]) -> np.ndarray:
        """``catalog_tensors`` output (one batch) -> (N, dim) L2-normalised embeddings."""
        total = None
        for x in tensors:
            v = self.embedder.run(x, features=False)[1]
            total = v if total is None else total + v
        return l2_normalize(total)

    def embed_query(self, image: Image.Image, *, max_regions: int = 3, multi_object: bool = False) -> QueryEmbedding:
        """A shopper's photo -> one vector per region (at most ``max_regions``), main region first.

        One product (``multi_object=False``): the main region, then the full image when the main
        one is a crop (the entry's crop policy decides), then other candidates. Several products
        (``multi_object=True``, a search for more than one object): one region per product from
        ``localize_products``, the main product first and the full photo second as its other view,
        then the other products — for every crop policy: a photo of several products is no view of
        any one of them (val 2x2 mosaics: per-product R@1 0.24 -> 0.73, while single photos keep
        their main-product R@1; docs/query-calibration.md).

        With SCDA (the default localizer) the full image is embedded at every scale during
        localization (reused as the full-image vector), and for one product the main region is
        found per scale as in ``embed_catalog``; ``regions[0].box`` is the one found at the first
        scale. Product regions come from the first scale's feature map."""
        if max_regions < 1:
            raise ValueError("max_regions must be >= 1")
        self.stage_timer.reset_last()
        full = full_region(image.size)
        sizes = self.entry.all_sizes
        full_vec = None
        per_scale_main: list[Region] | None = None
        with self.stage_timer.stage("localize"):
            if self.entry.crop.query == "none" and max_regions == 1 and not multi_object:
                candidates = [full]
            elif self.localizer is self._saliency:
                acc = np.zeros(self.dim, np.float32)
                per_scale = []
                first_map = None
                for size in sizes:
                    f, e = self.embedder.run(preprocess([image], self.preprocessing.with_size(size)))
                    first_map = f[0] if first_map is None else first_map
                    if not multi_object:
                        per_scale.append(self._saliency.from_features(f[0], image.size))
                    acc += e[0]
                full_vec = l2_normalize(acc)
                if multi_object:
                    candidates = self._saliency.products_from_features(first_map, image.size)
                else:
                    candidates = per_scale[0]
                    per_scale_main = [next((r for r in c if r.box != full.box), None) for c in per_scale]
            elif multi_object:
                candidates = self.localizer.localize_products(image)
            else:
                candidates = self.localizer.localize(image)
        others = [r for r in candidates if r.box != full.box]
        if not others or (self.entry.crop.query == "none" and not multi_object):
            regions = [full, *others]
        else:
            regions = [others[0], full, *others[1:]]
        regions = regions[:max_regions]
        main_is_crop = regions[0].box != full.box
        margin = self.entry.crop.margin
        with self.stage_timer.stage("embed"):
            vectors = np.zeros((len(regions), self.dim), np.float32)
            todo = [i for i, r in enumerate(regions) if not (r.box == full.box and full_vec is not None)]
            for i in range(len(regions)):
                if i not in todo:
                    vectors[i] = full_vec
            probs = None
            full_rows = [j for j, i in enumerate(todo) if regions[i].box == full.box]
            for k, size in enumerate(sizes):
                if not todo:
                    break
                crops = []
                for i in todo:
                    r = regions[i]
                    if i == 0 and main_is_crop and per_scale_main is not None:
                        r = per_scale_main[k] or r
                    crops.append(image if r.box == full.box else r.crop(image, margin))
                x = preprocess(crops, self.preprocessing.with_size(size))
                if k == 0 and self.classifies and full_rows:
                    emb, p = self.embedder.run_with_coarse(x)  # the head rides on the same pass
                    probs = p[full_rows[0]]
                else:
                    emb = self.embedder.run(x, features=False)[1]
                vectors[todo] += emb
            if self.classifies and probs is None:  # full photo not embedded above (SCDA path)
                probs = self.embedder.run_with_coarse(preprocess([image], self.preprocessing))[1][0]
            vectors = l2_normalize(vectors)
        category_probs = None
        if probs is not None:
            names = self.entry.classes["coarse"]
            category_probs = {names[i]: float(probs[i]) for i in range(min(len(names), len(probs)))}
        return QueryEmbedding(vectors=vectors, regions=regions, model_id=self.model_id,
                              category_probs=category_probs)
