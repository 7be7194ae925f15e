"""workers.dedup: trim_background's four-edge shortcut gives the whole-picture pass's result."""

from __future__ import annotations

import random

import numpy as np
import pytest
from PIL import Image

from tests.conftest import grocery_root
from workers.dedup import EDGE_CHECK_MIN_PIXELS, _past_tolerance, dhash_hex, trim_background


def whole_picture_trim(img: Image.Image, tol: int = 24) -> Image.Image:
    """The reference: the bounding box over every pixel, no shortcut."""
    img = img.convert("RGB")
    box = _past_tolerance(img, img.getpixel((0, 0)), tol)
    return img.crop(box) if box and (box[2] - box[0]) >= 9 and (box[3] - box[1]) >= 8 else img


def noise(w: int, h: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def framed(w: int, h: int, seed: int, sides: str, border: int = 12) -> Image.Image:
    """Noise with a white border on ``sides`` (any of "tblr") and a white top-left pixel."""
    img = Image.new("RGB", (w, h), (255, 255, 255))
    left, top = (border if "l" in sides else 0), (border if "t" in sides else 0)
    right, bottom = w - (border if "r" in sides else 0), h - (border if "b" in sides else 0)
    img.paste(noise(right - left, bottom - top, seed), (left, top))
    img.putpixel((0, 0), (255, 255, 255))  # trim takes the top-left pixel's colour for the border's
    return img


def cases() -> list[tuple[str, Image.Image]]:
    big = 300  # 300 x 300 >= EDGE_CHECK_MIN_PIXELS: the shortcut is tried
    assert big * big >= EDGE_CHECK_MIN_PIXELS
    out = [("noise", noise(big, big, 0)), ("noise, not square", noise(400, 180, 1)),
           ("small (no shortcut)", framed(120, 120, 2, "tblr"))]
    out += [(f"white border on {s}", framed(big, big, 3 + i, s)) for i, s in enumerate(["t", "b", "l", "r", "tblr", "lr"])]
    # a single background-coloured pixel at the top-left, the rest busy: the top row still has others
    img = noise(big, big, 10)
    img.putpixel((0, 0), (255, 255, 255))
    out.append(("one white corner", img))
    # an edge all within the tolerance of the corner's colour, but not identical to it
    img = noise(big, big, 11)
    for x in range(big):
        img.putpixel((x, 0), (200 + x % 10, 200, 200))
    out.append(("near-uniform top row", img))
    out.append(("greyscale input", noise(big, big, 12).convert("L")))
    return out


@pytest.mark.parametrize("name,img", cases(), ids=[n for n, _ in cases()])
def test_trim_equals_the_whole_picture_pass(name: str, img: Image.Image) -> None:
    fast, ref = trim_background(img), whole_picture_trim(img)
    assert fast.size == ref.size, name
    assert fast.tobytes() == ref.tobytes(), name
    assert dhash_hex(fast) == dhash_hex(ref)


def test_a_border_is_still_cropped() -> None:
    img = framed(300, 300, 5, "tblr")
    assert trim_background(img).size == (276, 276)


def test_random_bordered_pictures_agree() -> None:
    rng = random.Random(7)
    for i in range(60):  # busy pictures with a border on a random subset of the sides
        sides = "".join(s for s in "tblr" if rng.random() < 0.3)
        img = framed(rng.randint(200, 420), rng.randint(200, 420), 100 + i, sides, rng.randint(1, 30))
        assert trim_background(img).tobytes() == whole_picture_trim(img).tobytes(), (sides, img.size)


def test_the_grocery_photos_and_packshots_agree() -> None:
    paths = sorted(grocery_root().glob("**/*.jpg"))[::20]
    assert paths
    for p in paths:
        with Image.open(p) as f:
            img = f.convert("RGB")
        assert trim_background(img).tobytes() == whole_picture_trim(img).tobytes(), p
