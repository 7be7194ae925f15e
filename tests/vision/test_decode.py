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


# --- reduced-scale (draft) decoding of large JPEGs ---------------------------------------------------

def _gradient(size: tuple[int, int], mode: str = "RGB") -> Image.Image:
    """A smooth picture (survives DCT downscaling almost exactly), with a red stripe on the left."""
    w, h = size
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :].repeat(h, 0)
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None].repeat(w, 1)
    a = np.stack([x, y, np.full_like(x, 128)], axis=2).astype(np.uint8)
    a[:, : w // 4] = (255, 0, 0)
    return Image.fromarray(a).convert(mode)


def _sof_dimensions(data: bytes) -> tuple[int, int]:
    i = data.index(b"\xff\xc0")
    h, w = struct.unpack(">HH", data[i + 5 : i + 9])
    return w, h


def _claiming(data: bytes, width: int, height: int) -> bytes:
    """The JPEG ``data`` with its SOF0 header rewritten to claim width x height."""
    i = data.index(b"\xff\xc0")
    return data[: i + 5] + struct.pack(">HH", height, width) + data[i + 9 :]


@pytest.mark.parametrize(
    ("size", "min_side", "expected"),
    [
        ((1000, 640), 100, (250, 160)),  # min(1000 // 100, 640 // 100) = 6 -> 1/4
        ((640, 1000), 100, (160, 250)),  # portrait: the same test, on the shorter side
        ((1000, 640), 300, (500, 320)),  # 640 // 300 = 2 -> 1/2
        ((2000, 1800), 100, (250, 225)),  # 1/8 is the largest reduction there is
        ((1001, 641), 80, (126, 81)),  # sides round up: ceil(1001 / 8), ceil(641 / 8)
    ],
)
def test_large_jpeg_decodes_at_reduced_scale_keeping_the_shorter_side(size, min_side, expected):
    out = decode_image(_encode(_gradient(size), "JPEG", quality=90), draft_min_side=min_side)
    assert out.mode == "RGB" and out.size == expected
    assert min(out.size) >= min_side  # the guarantee is on the shorter side
    assert out.size[0] < size[0] and out.size[1] < size[1]
    # The largest reduction was taken: halving once more would go below min_side (or 1/8 already).
    assert min(out.size) < 2 * min_side or max(size) // max(out.size) == 8


def test_default_draft_min_side_on_a_camera_sized_jpeg():
    from vision.decode import DEFAULT_DRAFT_MIN_SIDE

    assert DEFAULT_DRAFT_MIN_SIDE == 1024
    data = _encode(Image.new("RGB", (3000, 2048), (90, 140, 30)), "JPEG", quality=90)
    out = decode_image(data)  # the default: min(3000 // 1024, 2048 // 1024) = 2 -> 1/2
    assert out.size == (1500, 1024) and min(out.size) >= DEFAULT_DRAFT_MIN_SIDE
    assert decode_image(data, draft_min_side=None).size == (3000, 2048)
    assert decode_image(data, draft_min_side=0).size == (3000, 2048)
    assert decode_image(_encode(Image.new("RGB", (3000, 2047)), "JPEG")).size == (3000, 2047)


@pytest.mark.parametrize(("size", "min_side"), [((1000, 640), 321), ((348, 348), 1024), ((1000, 640), 640)])
def test_jpeg_too_small_to_reduce_is_unchanged(size, min_side):
    out = decode_image(_encode(_gradient(size), "JPEG", quality=90), draft_min_side=min_side)
    assert out.size == size


def test_drafted_pixels_match_a_full_decode():
    data = _encode(_gradient((1600, 1200)), "JPEG", quality=95)
    small = decode_image(data, draft_min_side=150)  # 1/8 -> 200x150
    full = decode_image(data, draft_min_side=None).resize(small.size, Image.Resampling.BILINEAR)
    diff = np.abs(np.asarray(small, np.int16) - np.asarray(full, np.int16))
    assert small.size == (200, 150)
    assert diff.mean() < 2.0
    assert tuple(np.asarray(small)[75, 10]) == pytest.approx((255, 0, 0), abs=12)  # colour kept


@pytest.mark.parametrize(
    ("orientation", "expected", "red_at"),
    [(6, (100, 200), (5, 50)), (8, (100, 200), (195, 50)), (3, (200, 100), (50, 195)), (1, (200, 100), (50, 5))],
)
def test_exif_orientation_applied_to_a_drafted_jpeg(orientation, expected, red_at):
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _encode(_gradient((800, 400)), "JPEG", exif=exif.tobytes(), quality=95)  # red: left quarter
    out = decode_image(data, draft_min_side=100)  # stored 800x400 -> 1/4 -> 200x100, then rotated
    assert out.size == expected
    row, col = red_at  # 6 (90 CW): left -> top; 8 (90 CCW): left -> bottom; 3 (180): left -> right
    r, g, b = np.asarray(out)[row, col].astype(int)
    assert r > 200 and g < 60 and b < 60
    assert min(out.size) >= 100


def test_png_and_webp_are_not_reduced():
    img = _gradient((1000, 640))
    for fmt in ("PNG", "WEBP"):
        assert decode_image(_encode(img, fmt), draft_min_side=100).size == (1000, 640), fmt


def test_cmyk_and_grayscale_jpegs_reduced_to_rgb():
    out = decode_image(_encode(Image.new("CMYK", (800, 800), (0, 255, 255, 0)), "JPEG"), draft_min_side=100)
    assert out.mode == "RGB" and out.size == (100, 100)
    r, g, b = np.asarray(out)[50, 50].astype(int)
    assert r > 200 and g < 60 and b < 60
    out = decode_image(_encode(_gradient((800, 800), "L"), "JPEG"), draft_min_side=100)
    assert out.mode == "RGB" and out.size == (100, 100)


def test_pixel_cap_refuses_from_the_header_before_any_decode(monkeypatch):
    from PIL import JpegImagePlugin

    calls = []
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", lambda self, *a: calls.append("draft"))
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "load", lambda self: calls.append("load"))
    real = _encode(_gradient((64, 48)), "JPEG")
    assert _sof_dimensions(real) == (64, 48)
    # 9000 x 8000 = 72 MP claimed, a few hundred bytes of data: refused on the header alone, even
    # though at draft 1/8 it would be a mere 1.1 MP.
    bomb = _claiming(real, 9000, 8000)
    assert _reason(bomb, draft_min_side=1000) == "too_many_pixels"
    assert _reason(_encode(_gradient((1000, 640)), "JPEG"), max_pixels=639_999, draft_min_side=100) == (
        "too_many_pixels"
    )
    assert calls == []


def test_truncated_large_jpeg_still_fails_when_drafted():
    data = _encode(Image.effect_noise((1024, 1024), 50).convert("RGB"), "JPEG", quality=95)
    assert decode_image(data, draft_min_side=100).size == (128, 128)
    assert _reason(data[: len(data) // 3], draft_min_side=100) == "corrupt"


def test_load_image_passes_draft_min_side(tmp_path):
    p = tmp_path / "big.jpg"
    p.write_bytes(_encode(_gradient((1000, 640)), "JPEG"))
    assert load_image(p, draft_min_side=100).size == (250, 160)
    assert load_image(p, draft_min_side=None).size == (1000, 640)


def test_mpo_phone_jpeg_is_reduced_too():
    # Phones often write MPO (JPEG + extra frames); it sniffs as JPEG and its first frame is drafted.
    buf = io.BytesIO()
    Image.new("RGB", (1000, 640), (200, 10, 10)).save(
        buf, "MPO", save_all=True, append_images=[Image.new("RGB", (1000, 640), (10, 200, 10))]
    )
    out = decode_image(buf.getvalue(), draft_min_side=100)
    assert out.mode == "RGB" and out.size == (250, 160)
    r, g, _ = np.asarray(out)[80, 125].astype(int)
    assert r > 180 and g < 40
