"""The shared image transform: views, resize/crop geometry and odd-image conversions."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from tokenizer.transform import ImageTransform, center_crop, resize_shorter, to_rgb


def gradient(w: int, h: int) -> Image.Image:
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :].repeat(h, 0)
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None].repeat(w, 1)
    return Image.fromarray(np.stack([x, y, 255 - x], -1).astype(np.uint8))


def test_center_view_is_resize_shorter_then_center_crop():
    img = gradient(500, 375)
    out = ImageTransform(64, "center")(img)
    assert out.shape == (1, 3, 64, 64) and out.dtype == np.uint8
    resized = img.resize((85, 64), Image.BICUBIC)  # int(64 * 500 / 375) = 85
    expected = np.asarray(resized.crop((10, 0, 74, 64))).transpose(2, 0, 1)  # round(21 / 2) = 10
    assert np.array_equal(out[0], expected)


def test_resize_geometry_portrait_and_exact():
    assert resize_shorter(gradient(300, 601), 64).size == (64, 128)
    img = gradient(64, 64)
    assert resize_shorter(img, 64) is img
    assert center_crop(gradient(65, 64), 64).size == (64, 64)


def test_flip_view_is_mirror_of_center():
    out = ImageTransform(32, "flip")(gradient(50, 40))
    assert out.shape == (2, 3, 32, 32)
    assert np.array_equal(out[1], out[0][:, :, ::-1])


def test_tencrop_views():
    t = ImageTransform(32, "tencrop")
    out = t(gradient(80, 60))
    assert out.shape == (10, 3, 32, 32) and t.num_views == 10
    big = np.asarray(resize_shorter(gradient(80, 60), 35)).transpose(2, 0, 1)  # round(1.1 * 32) = 35
    assert np.array_equal(out[0], big[:, :32, :32])        # top-left
    assert np.array_equal(out[3], big[:, -32:, -32:])      # bottom-right
    for i in range(5):
        assert np.array_equal(out[5 + i], out[i][:, :, ::-1])


def test_bad_views_and_resolution():
    with pytest.raises(ValueError, match="views must be one of"):
        ImageTransform(32, "random")
    with pytest.raises(ValueError, match="resolution"):
        ImageTransform(0)


def roundtrip(img: Image.Image, fmt: str, **kw) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return Image.open(io.BytesIO(buf.getvalue()))


def test_grey_cmyk_palette_16bit_convert_to_rgb():
    assert to_rgb(Image.new("L", (4, 4), 128)).getpixel((0, 0)) == (128, 128, 128)
    cmyk = roundtrip(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG")
    r, g, b = to_rgb(cmyk).getpixel((4, 4))
    assert cmyk.mode == "CMYK" and r > 200 and g < 60 and b < 60  # pure red ink
    deep = roundtrip(Image.fromarray(np.full((4, 4), 65535, np.uint16)), "PNG")
    assert deep.mode.startswith("I") and to_rgb(deep).getpixel((0, 0)) == (255, 255, 255)
    half = Image.fromarray(np.full((4, 4), 32768, np.uint16))
    assert to_rgb(half).getpixel((0, 0)) == (128, 128, 128)


def test_transparency_is_composited_on_white():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    out = to_rgb(roundtrip(rgba, "PNG"))
    assert out.getpixel((1, 1)) == (255, 255, 255) and out.getpixel((0, 0)) == (255, 0, 0)
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    pal.info["transparency"] = 1
    assert to_rgb(roundtrip(pal, "PNG", transparency=1)).getpixel((2, 2)) == (255, 255, 255)


def test_exif_orientation_is_applied():
    img = gradient(40, 20)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    rotated = roundtrip(img, "JPEG", exif=exif.tobytes(), quality=95)
    assert rotated.size == (40, 20)
    up = to_rgb(rotated)
    assert up.size == (20, 40)


PEAK_GROWTH = """
import importlib.util, resource, sys
from PIL import Image
spec = importlib.util.spec_from_file_location("transform", sys.argv[4])  # without torch (tokenizer/__init__)
transform = sys.modules["transform"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(transform)
mode, w, h = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
fill = {"I;16": 1000, "I": 70000, "F": 0.5, "RGBA": (10, 20, 30, 128), "LA": (10, 128)}[mode]
img = Image.new(mode, (w, h), fill)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = transform.to_rgb(img)
assert out.mode == "RGB" and out.size == (w, h)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024 / (w * h))
"""


@pytest.mark.parametrize("mode", ["I;16", "F", "RGBA"])
def test_converting_a_huge_image_needs_no_float64_copy(mode):
    """Peak memory growth of to_rgb on a 16 Mpx image, measured in a fresh process: the RGB result
    (4 bytes/pixel in Pillow) plus small strips, below one float64 copy (8 bytes/pixel)."""
    import subprocess
    import sys
    from pathlib import Path

    source = Path(__file__).resolve().parents[1] / "tokenizer" / "transform.py"
    proc = subprocess.run([sys.executable, "-c", PEAK_GROWTH, mode, "4096", "4096", str(source)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    bytes_per_pixel = float(proc.stdout)
    assert bytes_per_pixel < 8, f"{mode}: to_rgb grew the peak by {bytes_per_pixel:.1f} bytes per pixel"
