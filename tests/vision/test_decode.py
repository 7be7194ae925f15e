from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from vision.decode import ImageError, decode_image, load_image


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height (no real pixel data behind it)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 16)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _reason(data: bytes, **kw) -> str:
    with pytest.raises(ImageError) as e:
        decode_image(data, **kw)
    return e.value.reason


def test_valid_jpeg_png_webp_decode_to_rgb():
    img = Image.new("RGB", (30, 20), (10, 200, 30))
    for fmt in ("JPEG", "PNG", "WEBP"):
        out = decode_image(_encode(img, fmt))
        assert out.mode == "RGB" and out.size == (30, 20), fmt
        assert abs(int(np.asarray(out)[10, 15, 1]) - 200) <= 8, fmt


def test_empty():
    assert _reason(b"") == "empty"


def test_non_image():
    assert _reason(b"GIF89a not allowed") == "unsupported"
    assert _reason(b"<html>hello</html>") == "unsupported"


def test_corrupt():
    assert _reason(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 10) == "corrupt"
    assert _reason(b"\xff\xd8\xff" + b"\x13" * 200) == "corrupt"


def test_truncated():
    data = _encode(Image.effect_noise((64, 64), 50).convert("RGB"), "PNG")
    assert _reason(data[: len(data) // 2]) == "corrupt"
    jpg = _encode(Image.effect_noise((256, 256), 50).convert("RGB"), "JPEG", quality=95)
    assert _reason(jpg[: len(jpg) // 3]) == "corrupt"


def test_oversized_bytes():
    data = _encode(Image.new("RGB", (8, 8)), "PNG")
    assert _reason(data, max_bytes=len(data) - 1) == "too_large"


def test_too_many_pixels_from_header_only():
    # Our cap (below PIL's own bomb threshold) and PIL's threshold both map to too_many_pixels.
    assert _reason(_png_claiming(10_000, 10_000)) == "too_many_pixels"
    assert _reason(_png_claiming(100_000, 100_000)) == "too_many_pixels"
    assert _reason(_encode(Image.new("RGB", (100, 100)), "PNG"), max_pixels=9_999) == "too_many_pixels"


def test_missing_file(tmp_path):
    with pytest.raises(ImageError) as e:
        load_image(tmp_path / "nope.jpg")
    assert e.value.reason == "missing"
    with pytest.raises(ImageError) as e:
        load_image(tmp_path)
    assert e.value.reason == "missing"


def test_load_image_from_disk(tmp_path):
    p = tmp_path / "a.webp"
    p.write_bytes(_encode(Image.new("RGB", (12, 7), "red"), "WEBP"))
    assert load_image(p).size == (12, 7)


def test_exif_rotation_applied():
    img = Image.new("RGB", (40, 20), "white")
    img.paste((255, 0, 0), (0, 0, 10, 20))  # red stripe on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    out = decode_image(_encode(img, "JPEG", exif=exif.tobytes(), quality=95))
    assert out.size == (20, 40)
    px = np.asarray(out).astype(int)
    assert px[2, 10, 0] > 200 and px[2, 10, 1] < 80  # left stripe is now at the top


def test_rgba_becomes_rgb_on_white():
    img = Image.new("RGBA", (10, 10), (255, 0, 0, 0))
    out = decode_image(_encode(img, "PNG"))
    assert out.mode == "RGB"
    assert tuple(np.asarray(out)[5, 5]) == (255, 255, 255)


def test_palette_with_transparency_and_plain_palette():
    p = Image.new("P", (10, 10), 1)
    p.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    out = decode_image(_encode(p, "PNG"))
    assert out.mode == "RGB" and tuple(np.asarray(out)[0, 0]) == (0, 255, 0)
    out = decode_image(_encode(p, "PNG", transparency=1))
    assert out.mode == "RGB" and tuple(np.asarray(out)[0, 0]) == (255, 255, 255)


def test_cmyk_jpeg():
    out = decode_image(_encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG"))
    assert out.mode == "RGB"
    r, g, b = np.asarray(out)[8, 8].astype(int)
    assert r > 200 and g < 60 and b < 60


def test_16bit_png():
    a = np.full((8, 8), 40000, dtype=np.uint16)
    out = decode_image(_encode(Image.fromarray(a), "PNG"))
    assert out.mode == "RGB"
    assert abs(int(np.asarray(out)[0, 0, 0]) - 40000 // 256) <= 1


def test_grayscale():
    out = decode_image(_encode(Image.new("L", (5, 5), 128), "PNG"))
    assert out.mode == "RGB" and tuple(np.asarray(out)[0, 0]) == (128, 128, 128)
