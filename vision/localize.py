"""Main-object localization: where in a photo is the product (or are the products)?

``Localizer.localize(image) -> list[Region]``: every candidate, the main one first, never empty (the
full image is the fallback). Boxes are ``(x0, y0, x1, y1)`` in image pixels, x1/y1 exclusive, inside
the image. Implementations:

- ``FullImageLocalizer`` — the whole image (no localization).
- ``SaliencyLocalizer`` — SCDA (Wei et al., 2017): sum the backbone's last feature map over channels,
  keep the positions above the mean, take connected components; the largest one (by summed
  activation) is the main object, the others are further candidates. Costs one backbone pass, which
  the runtime reuses (the feature map comes from the same ONNX graph as the embedding).
  For a photo that may hold several products (``localize_products``) it segments the same feature
  map instead: adjacent positions whose features look alike are merged (average-linkage region
  merging, ``product_regions_from_feature_map``), one region per segment. Saliency alone cannot do
  that: the fine-tuned model's activation differs ~10x between products, so on 2x2 mosaics of val
  photos SCDA found 10% of the products and segmentation 85% (docs/query-calibration.md).
- ``OnnxDetectorLocalizer`` — a user-supplied ONNX detector (see its docstring for the convention),
  with a score threshold and NMS.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class Region:
    box: Box  # (x0, y0, x1, y1) in image pixels, exclusive end
    score: float

    def crop(self, image: Image.Image, margin: float = 0.0) -> Image.Image:
        return image.crop(expand_box(self.box, image.size, margin))

    @property
    def area(self) -> int:
        return max(0, self.box[2] - self.box[0]) * max(0, self.box[3] - self.box[1])


def full_region(image_size: tuple[int, int], score: float = 1.0) -> Region:
    w, h = image_size
    return Region((0, 0, w, h), score)


def expand_box(box: Box, image_size: tuple[int, int], margin: float) -> Box:
    """Grow ``box`` by ``margin`` x its width/height on each side, clipped to the image."""
    w, h = image_size
    x0, y0, x1, y1 = box
    dx, dy = (x1 - x0) * margin, (y1 - y0) * margin
    return clip_box((x0 - dx, y0 - dy, x1 + dx, y1 + dy), image_size)


def clip_box(box, image_size: tuple[int, int]) -> Box:
    w, h = image_size
    x0 = int(np.clip(np.floor(box[0]), 0, w - 1))
    y0 = int(np.clip(np.floor(box[1]), 0, h - 1))
    x1 = int(np.clip(np.ceil(box[2]), x0 + 1, w))
    y1 = int(np.clip(np.ceil(box[3]), y0 + 1, h))
    return (x0, y0, x1, y1)


class Localizer(ABC):
    @abstractmethod
    def localize(self, image: Image.Image) -> list[Region]:
        """All candidate regions, main first; never empty."""

    def localize_products(self, image: Image.Image) -> list[Region]:
        """One region per product for a photo that may hold several (a multi-object search), the
        main product first, the full image last; never empty. Default: ``localize`` (a detector's
        boxes already are products)."""
        return self.localize(image)


class FullImageLocalizer(Localizer):
    def localize(self, image: Image.Image) -> list[Region]:
        return [full_region(image.size)]


def regions_from_feature_map(
    fmap: np.ndarray,
    image_size: tuple[int, int],
    *,
    max_regions: int = 5,
    min_score: float = 0.05,
    include_full: bool = True,
) -> list[Region]:
    """SCDA regions from one (C, h, w) feature map of ``image_size`` = (W, H) image.

    Score of a component = its share of the total above-mean activation. Components below
    ``min_score`` are dropped (except the main one). The full image is appended as the last
    candidate when ``include_full`` (and always when nothing was found)."""
    w, h = image_size
    a = fmap.sum(axis=0)
    mask = a > a.mean()
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
    regions: list[Region] = []
    if n:
        idx = np.arange(1, n + 1)
        mass = np.asarray(ndimage.sum(a - a.mean(), labels, idx), dtype=np.float64)
        total = float(mass.sum()) or 1.0
        slices = ndimage.find_objects(labels)
        fh, fw = a.shape
        sx, sy = w / fw, h / fh
        for k in np.argsort(-mass):
            score = float(mass[k] / total)
            if regions and score < min_score:
                break
            sl_y, sl_x = slices[k]
            box = clip_box((sl_x.start * sx, sl_y.start * sy, sl_x.stop * sx, sl_y.stop * sy), image_size)
            regions.append(Region(box, score))
            if len(regions) >= max_regions:
                break
    full = full_region(image_size, score=0.0)
    if not regions:
        return [full_region(image_size)]
    if include_full and all(r.box != full.box for r in regions):
        regions.append(full)
    return regions


def merge_similar_positions(fmap: np.ndarray, min_similarity: float) -> np.ndarray:
    """Segment a (C, h, w) feature map: start from one segment per position and keep merging the
    two 4-adjacent segments of highest average linkage (mean cosine similarity over all pairs of
    their positions) while it is at least ``min_similarity``. Returns (h, w) segment labels.

    Average linkage keeps the similarity scale of single positions (on val mosaics: ~0.4 within a
    product, ~0.1 across products for the fine-tuned model); the cosine of segment means would drift
    up as segments grow. Segments stay connected (only neighbours merge). At most hw - 1 merges of
    O((hw)^2) each: ~2-4 ms for the 1280 x 7 x 7 map of a 224 input on one core (einsum, below)."""
    c, h, w = fmap.shape
    n = h * w
    v = fmap.reshape(c, n).astype(np.float64)
    v /= np.linalg.norm(v, axis=0, keepdims=True) + 1e-12
    # Summed pairwise similarity between segments (per position to start). einsum, not BLAS: for a
    # product this small, handing it to BLAS threads on a busy machine cost ~30 ms against ~2 ms.
    link = np.einsum("ci,cj->ij", v, v)
    grid = np.arange(n).reshape(h, w)
    adjacent = np.zeros((n, n), bool)
    adjacent[grid[:, :-1].ravel(), grid[:, 1:].ravel()] = True
    adjacent[grid[:-1, :].ravel(), grid[1:, :].ravel()] = True
    adjacent |= adjacent.T
    size = np.ones(n)
    labels = np.arange(n)
    while adjacent.any():
        avg = np.where(adjacent, link / np.outer(size, size), -np.inf)
        a, b = divmod(int(np.argmax(avg)), n)
        if avg[a, b] < min_similarity:
            break
        link[a, :] += link[b, :]
        link[:, a] += link[:, b]
        adjacent[a, :] |= adjacent[b, :]
        adjacent[:, a] |= adjacent[:, b]
        adjacent[b, :] = adjacent[:, b] = False
        adjacent[a, a] = False
        size[a] += size[b]
        labels[labels == b] = a
    return labels.reshape(h, w)


def product_regions_from_feature_map(
    fmap: np.ndarray,
    image_size: tuple[int, int],
    *,
    max_regions: int = 5,
    min_similarity: float = 0.25,
    min_area: float = 0.06,
    iou_threshold: float = 0.5,
    include_full: bool = True,
) -> list[Region]:
    """One region per product from one (C, h, w) feature map of an ``image_size`` = (W, H) image.

    Segments (``merge_similar_positions``) covering at least ``min_area`` of the map become boxes;
    score = the segment's share of the map, the largest first, boxes overlapping a larger one by IoU
    above ``iou_threshold`` dropped. The full image is appended last when ``include_full`` (and
    returned alone when no segment qualifies). Defaults chosen on val 2x2 mosaics (60 mosaics,
    fine-tuned model): similarity 0.20 / 0.25 / 0.30 found 86 / 86 / 81% of the products at IoU
    >= 0.5 and a per-product R@1 of 0.70 / 0.73 / 0.74; 0.25 kept single photos' main R@1."""
    w, h = image_size
    fh, fw = fmap.shape[1:]
    labels = merge_similar_positions(fmap, min_similarity)
    sx, sy = w / fw, h / fh
    boxes, scores = [], []
    for lab in np.unique(labels):
        ys, xs = np.nonzero(labels == lab)
        share = len(ys) / (fh * fw)
        if share < min_area:
            continue
        boxes.append(clip_box((xs.min() * sx, ys.min() * sy, (xs.max() + 1) * sx, (ys.max() + 1) * sy), image_size))
        scores.append(share)
    full = full_region(image_size, score=0.0)
    regions: list[Region] = []
    if boxes:
        for i in nms(np.asarray(boxes, np.float64), np.asarray(scores), iou_threshold):
            if boxes[i] != full.box:
                regions.append(Region(boxes[i], float(scores[i])))
    regions = regions[:max_regions]
    if not regions:
        return [full_region(image_size)]
    if include_full:
        regions.append(full)
    return regions


class SaliencyLocalizer(Localizer):
    """SCDA on the embedding backbone. ``feature_fn(image) -> (C, h, w)`` runs the backbone (the
    runtime passes its ONNX session, so localization and embedding share one model)."""

    def __init__(
        self,
        feature_fn: Callable[[Image.Image], np.ndarray],
        *,
        max_regions: int = 5,
        min_score: float = 0.05,
        include_full: bool = True,
    ):
        self.feature_fn = feature_fn
        self.max_regions = max_regions
        self.min_score = min_score
        self.include_full = include_full

    def localize(self, image: Image.Image) -> list[Region]:
        return self.from_features(self.feature_fn(image), image.size)

    def localize_products(self, image: Image.Image) -> list[Region]:
        return self.products_from_features(self.feature_fn(image), image.size)

    def from_features(self, fmap: np.ndarray, image_size: tuple[int, int]) -> list[Region]:
        return regions_from_feature_map(
            fmap,
            image_size,
            max_regions=self.max_regions,
            min_score=self.min_score,
            include_full=self.include_full,
        )

    def products_from_features(self, fmap: np.ndarray, image_size: tuple[int, int]) -> list[Region]:
        return product_regions_from_feature_map(
            fmap, image_size, max_regions=self.max_regions, include_full=self.include_full
        )


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> list[int]:
    """Greedy non-maximum suppression; returns kept indices, best first."""
    order = np.argsort(-scores, kind="stable")
    x0, y0, x1, y1 = boxes.T
    areas = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    keep: list[int] = []
    while order.size:
        i = int(order[0])
        keep.append(i)
        rest = order[1:]
        iw = np.clip(np.minimum(x1[i], x1[rest]) - np.maximum(x0[i], x0[rest]), 0, None)
        ih = np.clip(np.minimum(y1[i], y1[rest]) - np.maximum(y0[i], y0[rest]), 0, None)
        inter = iw * ih
        iou = inter / np.maximum(areas[i] + areas[rest] - inter, 1e-12)
        order = rest[iou <= iou_threshold]
    return keep


class OnnxDetectorLocalizer(Localizer):
    """A user's ONNX object detector as the localizer.

    Convention the model must follow:
    - one input, float32 ``(1, 3, S, S)``: the RGB image resized (squashed) to S x S, values in [0, 1]
      (S is read from the model's input shape; pass ``input_size`` if that is dynamic);
    - two outputs, in this order: ``boxes`` float ``(N, 4)`` or ``(1, N, 4)`` as ``x0, y0, x1, y1``
      normalised to [0, 1] of the image, and ``scores`` float ``(N,)`` or ``(1, N)``.
    Boxes below ``score_threshold`` are dropped, the rest go through NMS at ``iou_threshold``;
    the highest-scoring box is the main region. The full image is the fallback (and the last
    candidate when ``include_full``).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        input_size: int | None = None,
        score_threshold: float = 0.3,
        iou_threshold: float = 0.5,
        max_regions: int = 5,
        include_full: bool = True,
        providers: list[str] | None = None,
    ):
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(path), providers=providers or ["CPUExecutionProvider"])
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        shape_size = inp.shape[-1] if isinstance(inp.shape[-1], int) else None
        self.input_size = input_size or shape_size
        if not self.input_size:
            raise ValueError(f"{path}: input size is dynamic; pass input_size")
        self.score_threshold = score_threshold
        self.iou_threshold = iou_threshold
        self.max_regions = max_regions
        self.include_full = include_full

    def localize(self, image: Image.Image) -> list[Region]:
        s = self.input_size
        x = np.asarray(image.convert("RGB").resize((s, s), Image.Resampling.BILINEAR), np.float32)
        x = (x / 255.0).transpose(2, 0, 1)[None]
        boxes, scores = self.session.run(None, {self.input_name: x})[:2]
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        scores = np.asarray(scores, np.float32).reshape(-1)
        ok = scores >= self.score_threshold
        boxes, scores = boxes[ok], scores[ok]
        w, h = image.size
        regions = []
        for i in nms(boxes, scores, self.iou_threshold)[: self.max_regions]:
            b = boxes[i] * np.array([w, h, w, h], np.float32)
            if b[2] <= b[0] or b[3] <= b[1]:
                continue
            regions.append(Region(clip_box(b, image.size), float(scores[i])))
        full = full_region(image.size, score=0.0)
        if not regions:
            return [full_region(image.size)]
        if self.include_full and all(r.box != full.box for r in regions):
            regions.append(full)
        return regions
