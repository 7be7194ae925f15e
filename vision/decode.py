"""Safe image decoding: bytes in, an RGB ``PIL.Image`` out, or an ``ImageError`` with a reason code.

Guards: a byte cap (checked before decoding), a pixel cap checked from the header before pixels are
decoded (decompression bombs), format sniffing (JPEG/PNG/WebP only), a full decode so that truncated
files fail here rather than later, EXIF orientation applied, palette/alpha/CMYK/16-bit converted to RGB.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

ALLOWED_FORMATS = frozenset({"JPEG", "PNG", "WEBP"})
DEFAULT_MAX_BYTES = 20 * 1024 * 1024
DEFAULT_MAX_PIXELS = 40_000_000


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
    data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES, max_pixels: int = DEFAULT_MAX_PIXELS
) -> Image.Image:
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
            img.load()  # full decode: truncated data fails here
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
    path: str | Path, *, max_bytes: int = DEFAULT_MAX_BYTES, max_pixels: int = DEFAULT_MAX_PIXELS
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
    return decode_image(data, max_bytes=max_bytes, max_pixels=max_pixels)
