"""Image hygiene hashes: MD5 of the bytes (exact duplicates) and a 64-bit dHash (near duplicates).

dHash (difference hash): greyscale, resize to 9x8, one bit per horizontal neighbour comparison. It is
robust to resizing, brightness and mild blur, and the fastest of the perceptual hashes (WeChat's
choice for catalog dedup). Two images whose dHashes differ in at most ``NEAR_DUP_MAX_BITS`` bits are
near-duplicate candidates.

Packshots of *different* products on the same white background share most of the 9x8 grid (on the
grocery catalog, 20 of 81 products fell into 5 false groups), so the hash is taken of the picture with
its uniform border trimmed (``trim_background``), and ingest also requires the embeddings to agree
(``NEAR_DUP_MIN_COSINE``) before linking two items as twins.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache

import numpy as np
from PIL import Image, ImageChops

NEAR_DUP_MAX_BITS = 6
NEAR_DUP_MIN_COSINE = 0.92


def md5_hex(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


@lru_cache(maxsize=8)
def _threshold_lut(tol: int) -> list[int]:
    return [255 if v > tol else 0 for v in range(256)]


# From this many pixels up, ``trim_background`` first looks at the four edges alone. Below it the
# strips do not pay: on the bench's 128 x 128 drawings (uniform background, so the whole-picture pass
# runs anyway) they added 0.03 ms; at 198 x 198 it is a wash (busy photos 0.14 -> 0.11 ms, white-
# background packshots 0.11 -> 0.13 ms).
EDGE_CHECK_MIN_PIXELS = 256 * 256


def _past_tolerance(img: Image.Image, colour: tuple, tol: int) -> tuple[int, int, int, int] | None:
    """Bounding box of the pixels whose difference from ``colour`` is past ``tol`` (greyscale)."""
    bg = Image.new("RGB", img.size, colour)
    return ImageChops.difference(img, bg).convert("L").point(_threshold_lut(tol)).getbbox()


def trim_background(img: Image.Image, tol: int = 24) -> Image.Image:
    """Crop a uniform border (the top-left pixel's colour, within ``tol``).

    Where every edge (top and bottom row, left and right column) has a pixel past the tolerance,
    the bounding box is the whole picture, so there is nothing to crop: that is decided on the four
    one-pixel strips, and only pictures with a background edge take the whole-picture pass. Same
    result either way; on the grocery shop photos (nearly all without a uniform border) 0.46 ->
    0.13 ms a picture (tests/workers/test_dedup.py checks the two agree)."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    colour = img.getpixel((0, 0))
    w, h = img.size
    if w * h >= EDGE_CHECK_MIN_PIXELS and all(
        _past_tolerance(img.crop(edge), colour, tol) is not None
        for edge in ((0, 0, w, 1), (0, h - 1, w, h), (0, 0, 1, h), (w - 1, 0, w, h))
    ):
        return img
    box = _past_tolerance(img, colour, tol)
    return img.crop(box) if box and (box[2] - box[0]) >= 9 and (box[3] - box[1]) >= 8 else img


def dhash64(image: Image.Image) -> int:
    small = image.convert("L").resize((9, 8), Image.Resampling.LANCZOS)
    px = np.asarray(small, dtype=np.int16)
    bits = (px[:, 1:] > px[:, :-1]).ravel()  # 64 bits, row by row, first bit most significant
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def dhash_hex(image: Image.Image) -> str:
    return f"{dhash64(image):016x}"
