"""Image -> model input. The ONE pre-processing function, used by the ONNX export check, the torch
reference, the tuning script and serving, so that none of them can drift.

Parameters come from the model's registry entry (``Preprocess`` below is stored in it).

Normalisation: the EfficientNet-Lite weights were converted from TensorFlow, where the Lite builder
uses ``MEAN_RGB = [127.0]*3, STDDEV_RGB = [128.0]*3`` (inputs in ~[-1, 1]); the PyTorch port inherits
the weights unchanged, so that is what it expects. Measured on grocery (see ``reports/tune-val.json``
and the registry entry's notes): the [-1, 1] scaling gives better ImageNet top-5 on the fruit/veg
photos and better retrieval than torchvision's mean/std, so it is the default.

Resize: ``squash`` (resize to size x size, aspect not kept) keeps the whole product in frame; the
shop photos are square anyway. ``center_crop`` (shorter side to size, then centre crop) is available.
Sides must be multiples of 32 (see ``offline.training.backbone``: static TF-SAME padding is exact only then).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
from PIL import Image

TF_LITE_MEAN = (127.0, 127.0, 127.0)
TF_LITE_STD = (128.0, 128.0, 128.0)
TORCHVISION_MEAN = (123.675, 116.28, 103.53)
TORCHVISION_STD = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class Preprocess:
    """How an RGB image becomes the model input. Stored verbatim in the registry entry."""

    input_size: int = 224
    resize: Literal["squash", "center_crop"] = "squash"
    mean: tuple[float, float, float] = field(default=TF_LITE_MEAN)  # in 0..255 pixel units
    std: tuple[float, float, float] = field(default=TF_LITE_STD)

    def __post_init__(self) -> None:
        if self.input_size <= 0 or self.input_size % 32:
            raise ValueError(f"input_size must be a positive multiple of 32, got {self.input_size}")
        if self.resize not in ("squash", "center_crop"):
            raise ValueError(f"unknown resize policy {self.resize!r}")
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    def with_size(self, input_size: int) -> Preprocess:
        return Preprocess(input_size=input_size, resize=self.resize, mean=self.mean, std=self.std)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocess:
        return cls(
            input_size=int(d["input_size"]),
            resize=d.get("resize", "squash"),
            mean=tuple(d.get("mean", TF_LITE_MEAN)),
            std=tuple(d.get("std", TF_LITE_STD)),
        )


def _resize(img: Image.Image, size: int, policy: str) -> Image.Image:
    if img.mode != "RGB":
        img = img.convert("RGB")
    if policy == "squash":
        return img.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=None)
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.Resampling.BILINEAR)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def preprocess(images: Image.Image | Sequence[Image.Image], cfg: Preprocess) -> np.ndarray:
    """PIL RGB image(s) -> float32 array (N, 3, S, S), normalised with ``cfg.mean``/``cfg.std``."""
    if isinstance(images, Image.Image):
        images = [images]
    if len(images) == 0:
        return np.zeros((0, 3, cfg.input_size, cfg.input_size), np.float32)
    mean = np.asarray(cfg.mean, np.float32)
    inv_std = 1.0 / np.asarray(cfg.std, np.float32)
    out = np.empty((len(images), 3, cfg.input_size, cfg.input_size), np.float32)
    for i, img in enumerate(images):
        a = np.asarray(_resize(img, cfg.input_size, cfg.resize), dtype=np.float32)
        out[i] = ((a - mean) * inv_std).transpose(2, 0, 1)
    return out
