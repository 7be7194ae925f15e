"""GroceryStore data for training: class table, splits, P×K sampler, augmentation.

Every training sample is ``(item_index, seed)``; the augmentation draws all its randomness from
``np.random.default_rng(seed)``, so a run is reproducible whatever the number of loader workers.
Items are the train shop photos plus one "iconic" (catalog) item per class; both carry the product's
fine label. Iconic items are rendered as shop-photo look-alikes (``synth_shop``) most of the time.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter
from scipy import ndimage

from vision.preprocess import TF_LITE_MEAN, TF_LITE_STD


@dataclass(frozen=True)
class ClassInfo:
    fine_id: int
    name: str
    coarse_id: int
    coarse_name: str
    iconic: Path


@dataclass(frozen=True)
class Sample:
    path: Path
    fine_id: int
    coarse_id: int
    iconic: bool = False


def data_dir(root: str | Path) -> Path:
    root = Path(root)
    return root / "dataset" if (root / "dataset").is_dir() else root


def read_classes(root: str | Path) -> list[ClassInfo]:
    d = data_dir(root)
    out = []
    with open(d / "classes.csv", newline="", encoding="utf-8") as f:
        rows = csv.reader(f)
        next(rows, None)
        for r in rows:
            if len(r) >= 5:
                out.append(ClassInfo(int(r[1]), r[0].strip(), int(r[3]), r[2].strip(), d / r[4].strip().lstrip("/")))
    return sorted(out, key=lambda c: c.fine_id)


def read_split(root: str | Path, split: str) -> list[Sample]:
    d = data_dir(root)
    out = []
    with open(d / f"{split}.txt", encoding="utf-8") as f:
        for line in f:
            p = [x.strip() for x in line.split(",")]
            if len(p) >= 3 and p[0]:
                out.append(Sample(d / p[0], int(p[1]), int(p[2])))
    return out


def parse_class_spec(spec: str | None) -> set[int] | None:
    """``"0-40,45,50-52"`` -> {0..40, 45, 50, 51, 52}; None/"" -> None (all)."""
    if not spec:
        return None
    ids: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            a, b = part.split("-", 1)
            ids.update(range(int(a), int(b) + 1))
        else:
            ids.add(int(part))
    return ids


def load_rgb(path: Path) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


# ---------------------------------------------------------------------------------------------------
# augmentation (PIL / numpy only)
# ---------------------------------------------------------------------------------------------------

def to_tensor(img: Image.Image) -> torch.Tensor:
    """uint8 RGB PIL (already S×S) -> float (3, S, S) with the serving normalisation (vision.preprocess)."""
    a = np.asarray(img, dtype=np.float32)
    a = (a - np.asarray(TF_LITE_MEAN, np.float32)) / np.asarray(TF_LITE_STD, np.float32)
    return torch.from_numpy(a.transpose(2, 0, 1).copy())


def random_resized_crop(img: Image.Image, size: int, rng: np.random.Generator,
                        scale=(0.35, 1.0), ratio=(3 / 4, 4 / 3)) -> Image.Image:
    w, h = img.size
    area = w * h
    for _ in range(10):
        target = area * rng.uniform(*scale)
        ar = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = int(round(math.sqrt(target * ar))), int(round(math.sqrt(target / ar)))
        if 0 < cw <= w and 0 < ch <= h:
            x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            return img.resize((size, size), Image.Resampling.BILINEAR, box=(x, y, x + cw, y + ch))
    return img.resize((size, size), Image.Resampling.BILINEAR)


def color_jitter(a: np.ndarray, rng: np.random.Generator, strength: float = 0.3, hue: float = 0.02) -> np.ndarray:
    """float32 HxWx3 in 0..255 -> jittered (brightness, contrast, saturation, small hue shift)."""
    b = rng.uniform(1 - strength, 1 + strength)
    c = rng.uniform(1 - strength, 1 + strength)
    s = rng.uniform(1 - strength, 1 + strength)
    a = a * b
    a = (a - a.mean()) * c + a.mean()
    gray = a @ np.array([0.299, 0.587, 0.114], np.float32)
    a = (a - gray[..., None]) * s + gray[..., None]
    if hue > 0:  # small hue rotation in YIQ space (keeps green vs red apples apart)
        th = rng.uniform(-hue, hue) * 2 * math.pi
        cs, sn = math.cos(th), math.sin(th)
        yiq = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], np.float32)
        rot = np.array([[1, 0, 0], [0, cs, -sn], [0, sn, cs]], np.float32)
        m = np.linalg.inv(yiq) @ rot @ yiq
        a = a @ m.T.astype(np.float32)
    return np.clip(a, 0, 255)


def random_erasing(t: torch.Tensor, rng: np.random.Generator, p: float = 0.4,
                   scale=(0.02, 0.2), ratio=(0.3, 3.3)) -> torch.Tensor:
    """Zhong et al. random erasing on a normalised (3, S, S) tensor: a box filled with noise."""
    if rng.random() >= p:
        return t
    _, h, w = t.shape
    for _ in range(10):
        area = h * w * rng.uniform(*scale)
        ar = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        eh, ew = int(round(math.sqrt(area * ar))), int(round(math.sqrt(area / ar)))
        if 0 < eh < h and 0 < ew < w:
            y, x = int(rng.integers(0, h - eh + 1)), int(rng.integers(0, w - ew + 1))
            t = t.clone()
            t[:, y:y + eh, x:x + ew] = torch.from_numpy(rng.uniform(-1, 1, (3, eh, ew)).astype(np.float32))
            return t
    return t


def product_mask(img: Image.Image, white: int = 235) -> Image.Image:
    """Foreground mask ("L") of a catalog image shot on white: non-white pixels, holes filled, opened,
    softened. Falls back to a full mask if nearly nothing is found."""
    a = np.asarray(img.convert("RGB"))
    fg = a.min(axis=2) < white
    fg = ndimage.binary_opening(fg, iterations=1)
    fg = ndimage.binary_fill_holes(fg)
    if fg.mean() < 0.05:
        fg = np.ones_like(fg)
    m = Image.fromarray((fg * 255).astype(np.uint8), "L")
    return m.filter(ImageFilter.GaussianBlur(1.0))


def synth_shop(iconic: Image.Image, mask: Image.Image, background: Image.Image, size: int,
               rng: np.random.Generator) -> Image.Image:
    """Catalog → shop-photo look-alike: the product cut out of its white background, scaled,
    rotated and pasted at a random place on ``background`` (a crop of another class's shop photo),
    sometimes blurred."""
    bg = random_resized_crop(background, size, rng, scale=(0.2, 1.0))
    scale = rng.uniform(0.45, 1.0)
    side = max(8, int(size * scale))
    fg = iconic.resize((side, side), Image.Resampling.BILINEAR)
    m = mask.resize((side, side), Image.Resampling.BILINEAR)
    angle = float(rng.uniform(-25, 25))
    fg = fg.rotate(angle, resample=Image.Resampling.BILINEAR, expand=True)
    m = m.rotate(angle, resample=Image.Resampling.BILINEAR, expand=True)
    if rng.random() < 0.5:
        fg, m = fg.transpose(Image.Transpose.FLIP_LEFT_RIGHT), m.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    fw, fh = fg.size
    x = int(rng.integers(-fw // 5, max(1, size - fw + fw // 5 + 1)))
    y = int(rng.integers(-fh // 5, max(1, size - fh + fh // 5 + 1)))
    # shade the pasted product a little so its lighting differs from the studio shot
    fa = color_jitter(np.asarray(fg, np.float32), rng, strength=0.2, hue=0.0)
    fg = Image.fromarray(fa.astype(np.uint8))
    bg.paste(fg, (x, y), m)
    if rng.random() < 0.35:
        bg = bg.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.5))))
    return bg


class TrainSet(torch.utils.data.Dataset):
    """Items: shop photos (``samples``) followed by one iconic item per class in ``classes``.
    ``__getitem__((index, seed))`` -> (image tensor, fine label, coarse label, is_iconic).
    Catalog→shop syntheses paste a catalog image on a background cut from another product's shop
    photo: one of ``samples``, or of ``backgrounds`` when given (adapting to a catalog that has no
    shop photos: photos of other products, never trained on)."""

    def __init__(self, samples: Sequence[Sample], classes: Sequence[ClassInfo], size: int = 192,
                 p_synth: float = 0.75, p_erase: float = 0.4, preload: bool = True,
                 backgrounds: Sequence[Sample] = ()):
        self.size = size
        self.p_synth, self.p_erase = p_synth, p_erase
        self.items: list[Sample] = list(samples) + [
            Sample(c.iconic, c.fine_id, c.coarse_id, iconic=True) for c in classes
        ]
        self.labels = np.array([s.fine_id for s in self.items])
        self.is_iconic = np.array([s.iconic for s in self.items])
        self.photo_idx = np.flatnonzero(~self.is_iconic)
        self.backgrounds = list(backgrounds)
        self._bg_labels = np.array([b.fine_id for b in self.backgrounds], dtype=int)
        self._bg_cache: dict[int, Image.Image] = {}
        self._cache: dict[int, Image.Image] = {}
        self._masks: dict[int, Image.Image] = {}
        if preload:
            for i in range(len(self.items)):
                self._img(i)

    def __len__(self) -> int:
        return len(self.items)

    def _img(self, i: int) -> Image.Image:
        im = self._cache.get(i)
        if im is None:
            im = load_rgb(self.items[i].path)
            self._cache[i] = im
        return im

    def _mask(self, i: int) -> Image.Image:
        m = self._masks.get(i)
        if m is None:
            m = product_mask(self._img(i))
            self._masks[i] = m
        return m

    def render(self, i: int, rng: np.random.Generator) -> Image.Image:
        s = self.items[i]
        img = self._img(i)
        if s.iconic and rng.random() < self.p_synth:
            bg = self._background(s.fine_id, rng)
            if bg is not None:
                return synth_shop(img, self._mask(i), bg, self.size, rng)
        scale = (0.5, 1.0) if s.iconic else (0.35, 1.0)
        out = random_resized_crop(img, self.size, rng, scale=scale)
        if rng.random() < 0.5:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return out

    def _background(self, fine_id: int, rng: np.random.Generator) -> Image.Image | None:
        if self.backgrounds:
            others = np.flatnonzero(self._bg_labels != fine_id)
            if not len(others):
                return None
            j = int(rng.choice(others))
            if j not in self._bg_cache:
                self._bg_cache[j] = load_rgb(self.backgrounds[j].path)
            return self._bg_cache[j]
        others = self.photo_idx[self.labels[self.photo_idx] != fine_id]
        return self._img(int(rng.choice(others))) if len(others) else None

    def __getitem__(self, key):
        i, seed = key
        rng = np.random.default_rng(int(seed))
        img = self.render(int(i), rng)
        a = color_jitter(np.asarray(img, np.float32), rng)
        t = to_tensor(Image.fromarray(a.astype(np.uint8)))
        t = random_erasing(t, rng, p=self.p_erase)
        s = self.items[int(i)]
        return t, s.fine_id, s.coarse_id, s.iconic


class PKSampler(torch.utils.data.Sampler):
    """Class-balanced batches: P classes × K items each. Classes are visited in a fresh random order
    every epoch (all classes equally often); within a class, ``iconic_per_class`` of the K slots go to
    the class's catalog item (if it has one) and the rest to its shop photos, drawn without
    replacement while possible. Yields lists of ``(item_index, seed)``."""

    def __init__(self, labels: Sequence[int], is_iconic: Sequence[bool], p: int = 16, k: int = 4,
                 batches_per_epoch: int | None = None, iconic_per_class: int = 1, seed: int = 0):
        self.labels = np.asarray(labels)
        self.is_iconic = np.asarray(is_iconic, bool)
        self.p, self.k, self.seed = p, k, seed
        self.iconic_per_class = iconic_per_class
        self.classes = np.unique(self.labels)
        if len(self.classes) < p:
            raise ValueError(f"P={p} > number of classes {len(self.classes)}")
        self.photos = {c: np.flatnonzero((self.labels == c) & ~self.is_iconic) for c in self.classes}
        self.iconics = {c: np.flatnonzero((self.labels == c) & self.is_iconic) for c in self.classes}
        n_photos = int((~self.is_iconic).sum())
        self.batches_per_epoch = batches_per_epoch or max(1, n_photos // (p * k))
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        order: list[int] = []
        for _ in range(self.batches_per_epoch):
            # the next P distinct classes of the running order (a class repeated across a permutation
            # boundary is deferred to the next batch, so every class is drawn equally often, ±1)
            chosen: list[int] = []
            while len(chosen) < self.p:
                if not order or all(c in chosen for c in order):
                    order += list(rng.permutation(self.classes))
                j = next(j for j, c in enumerate(order) if c not in chosen)
                chosen.append(order.pop(j))
            batch: list[int] = []
            for c in chosen:
                n_ic = min(self.iconic_per_class, len(self.iconics[c])) if len(self.photos[c]) else self.k
                ic = list(rng.choice(self.iconics[c], n_ic, replace=len(self.iconics[c]) < n_ic)) if n_ic else []
                n_ph = self.k - len(ic)
                ph = self.photos[c]
                if n_ph and len(ph):
                    ph = list(rng.choice(ph, n_ph, replace=len(ph) < n_ph))
                else:
                    ph = []
                batch += [int(x) for x in ic + ph]
            seeds = rng.integers(0, 2**31 - 1, len(batch))
            yield [(i, int(s)) for i, s in zip(batch, seeds, strict=True)]
