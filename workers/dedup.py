"""Image hygiene hashes: MD5 of the bytes (exact duplicates) and a 64-bit dHash (near duplicates).

dHash (difference hash): greyscale, resize to 9x8, one bit per horizontal neighbour comparison. It is
robust to resizing, brightness and mild blur, and the fastest of the perceptual hashes (WeChat's
choice for catalog dedup). Two images whose dHashes differ in at most ``NEAR_DUP_MAX_BITS`` bits are
near duplicates.
"""

from __future__ import annotations

import hashlib

import numpy as np
from PIL import Image

NEAR_DUP_MAX_BITS = 6


def md5_hex(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def dhash64(image: Image.Image) -> int:
    small = image.convert("L").resize((9, 8), Image.Resampling.LANCZOS)
    px = np.asarray(small, dtype=np.int16)
    bits = (px[:, 1:] > px[:, :-1]).flatten()
    value = 0
    for b in bits:
        value = (value << 1) | int(b)
    return value


def dhash_hex(image: Image.Image) -> str:
    return f"{dhash64(image):016x}"


def hamming(a: int | str, b: int | str) -> int:
    ai = int(a, 16) if isinstance(a, str) else a
    bi = int(b, 16) if isinstance(b, str) else b
    return (ai ^ bi).bit_count()
