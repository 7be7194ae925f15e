"""Safe image decoding: bytes in, an RGB ``PIL.Image`` out, or an ``ImageError`` with a reason code.

Guards: a byte cap (checked before decoding), a pixel cap checked from the header before pixels are
decoded (decompression bombs), format sniffing (JPEG/PNG/WebP only), a full decode so that truncated
files fail here rather than later, EXIF orientation applied, palette/alpha/CMYK/16-bit converted to RGB.

Large JPEGs are decoded at a reduced scale (libjpeg's DCT scaling, PIL "draft" mode: 1/2, 1/4 or
1/8): the largest reduction that still leaves the shorter side >= ``draft_min_side`` (default 1024).
A 36-MP camera photo (7360x4912) then decodes to 1840x1228: peak RSS of one decode 276 -> 17 MiB,
of six at once 1.56 GiB -> 80 MiB, decode time 232 -> 46 ms (``python -m offline bench-decode``,
medians of 5). Every caller gets it: the query service, the catalog ingest, evaluation. Progressive
JPEGs gain less (276 -> 112 MiB): libjpeg keeps the whole image's coefficients whatever the scale.

Why 1024, on the shorter side: nothing downstream looks at more. The models take at most 288 px
(``lite0-imagenet`` scales 224+288; the trained models 192/224) and ``squash``/``center_crop``
resize both sides to that, so it is the shorter side that must not end up upsampled. A localizer
crop (SCDA ``crop.*: saliency``, or a detector's box) must itself stay >= the input size: at 1024
that holds for crops down to 28% of the shorter side at 288 px (22% at 224). The pipeline was
measured on 348x348 val photos; 1024 is ~3x that. Val photos upscaled to 4896 px: Recall@1 0.8581
off, 0.8514 at 1024 (2 of 296 top-1s flip, one a 0.0001-margin tie; a full decode box-reduced
by 4 flips the same 2, so it is the two-step downscale, not the DCT scaling; mean top-1 margin
unchanged), 0.8547 at 512; upscaled catalog images: 0.8547 off, 0.8514 at 1024 (1 flip). PNG and
WebP have no such cheap reduced decode and are decoded fully.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

ALLOWED_FORMATS = frozenset({"JPEG", "PNG", "WEBP"})
DEFAULT_MAX_BYTES = 20 * 1024 * 1024
DEFAULT_MAX_PIXELS = 40_000_000
DEFAULT_DRAFT_MIN_SIDE = 1024  # see the module docstring; None turns reduced-scale JPEG decoding off


class ImageError(ValueError):
    """An image could not be used. ``reason`` is a stable code for metrics and dead letters:
    ``missing``, ``empty``, ``too_large``, ``too_many_pixels``, ``unsupported``, ``corrupt``."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def sniff_format(data: bytes) -> str | None:
    """Format from magic bytes, without trusting names or headers."""
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def decode_image(
    data: bytes,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft_min_side: int | None = DEFAULT_DRAFT_MIN_SIDE,
) -> Image.Image:
    """``data`` -> RGB image, or ``ImageError``. ``max_pixels`` applies to the size in the header
    (before any decoding, whatever the draft scale). ``draft_min_side``: a JPEG whose shorter side
    is at least twice this is decoded at the largest DCT reduction (1/2, 1/4, 1/8) that keeps
    its shorter side >= ``draft_min_side`` (orientation does not matter: the test is on the shorter
    side); ``None`` or 0 decodes at full size."""
    if not data:
        raise ImageError("empty", "zero bytes")
    if len(data) > max_bytes:
        raise ImageError("too_large", f"{len(data)} bytes > limit {max_bytes}")
    fmt = sniff_format(data)
    if fmt is None:
        raise ImageError("unsupported", "not a JPEG, PNG or WebP file")
    try:
        with warnings.catch_warnings():
            # Our own pixel cap below replaces PIL's global bomb check (which only warns below 2x).
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=[fmt])
            w, h = img.size
            if w <= 0 or h <= 0:
                raise ImageError("corrupt", f"bad dimensions {w}x{h}")
            if w * h > max_pixels:
                raise ImageError("too_many_pixels", f"{w}x{h} = {w * h} pixels > limit {max_pixels}")
            if fmt == "JPEG" and draft_min_side and min(w, h) >= 2 * draft_min_side:
                # Picks the largest of 1/8, 1/4, 1/2 leaving both sides >= draft_min_side (PIL
                # JpegImageFile.draft: scale = min(w // rw, h // rh)); applies to the stored
                # (pre-EXIF-rotation) frame, the same either way for a square request.
                img.draft("RGB", (draft_min_side, draft_min_side))
            img.load()  # full decode (at the draft scale): truncated data fails here
            img = ImageOps.exif_transpose(img)
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError("too_many_pixels", str(e)) from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageError("corrupt", f"{fmt} decode failed: {e}") from e
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        img = img.point(lambda v: v * (1 / 256)).convert("L")
    return img.convert("RGB")


def load_image(
    path: str | Path,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft_min_side: int | None = DEFAULT_DRAFT_MIN_SIDE,
) -> Image.Image:
    p = Path(path)
    try:
        size = p.stat().st_size
    except FileNotFoundError as e:
        raise ImageError("missing", f"no such file: {p}") from e
    except OSError as e:
        raise ImageError("missing", f"cannot stat {p}: {e}") from e
    if size > max_bytes:
        raise ImageError("too_large", f"{size} bytes > limit {max_bytes}")
    try:
        data = p.read_bytes()
    except IsADirectoryError as e:
        raise ImageError("missing", f"{p} is a directory") from e
    except OSError as e:
        raise ImageError("missing", f"cannot read {p}: {e}") from e
    return decode_image(data, max_bytes=max_bytes, max_pixels=max_pixels, draft_min_side=draft_min_side)
