"""The one image transform used by every path (pipeline, tests, demo, inspection).

Official TiTok preprocessing: RGB, resize the shorter side to R with PIL bicubic (antialiased),
center crop R x R, values / 255. Views multiply each image into V crops.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

VIEWS = {"center": 1, "flip": 2, "tencrop": 10}
EXIF_ORIENTATION = 0x0112
TENCROP_SCALE = 1.1


# Conversions of huge images run over row strips of about this many pixels, so their temporaries
# stay small (a full-size float64 copy of a 64 Mpx 16-bit image would be 512 MiB).
STRIP_PIXELS = 1 << 20


def _strips(img: Image.Image):
    rows = max(1, STRIP_PIXELS // max(1, img.width))
    for top in range(0, img.height, rows):
        yield (0, top, img.width, min(img.height, top + rows))


def _grey8(img: Image.Image, scale) -> Image.Image:
    """8-bit greyscale from a 16/32-bit or float image, ``scale`` applied strip by strip."""
    out = np.empty((img.height, img.width), np.uint8)
    for box in _strips(img):
        out[box[1]:box[3]] = scale(np.asarray(img.crop(box)))
    return Image.fromarray(out, "L")


def _on_white(img: Image.Image) -> Image.Image:
    """RGB of an image with transparency composited on white, strip by strip."""
    out = Image.new("RGB", img.size)
    for box in _strips(img):
        part = img.crop(box).convert("RGBA")
        white = Image.new("RGBA", part.size, (255, 255, 255, 255))
        out.paste(Image.alpha_composite(white, part).convert("RGB"), box)
    return out


def to_rgb(img: Image.Image) -> Image.Image:
    """Upright 8-bit RGB: EXIF orientation applied; grey, CMYK, palette, 16-bit converted;
    transparency composited on white. Temporaries are bounded by ``STRIP_PIXELS``, not the image."""
    if img.getexif().get(EXIF_ORIENTATION, 1) != 1:  # exif_transpose copies even an upright image
        img = ImageOps.exif_transpose(img)
    if img.mode == "P" and "transparency" not in img.info:
        img = img.convert("RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16/32-bit greyscale: scale the full range to 8 bits instead of clipping at 255, rounding
        # to nearest: floor(v * 255 / top + 1/2) in integers.
        top = 65535 if img.mode.startswith("I;16") or img.getextrema()[1] > 255 else 255
        img = _grey8(img, lambda a: ((np.clip(a, 0, top).astype(np.int64) * 510 + top) // (2 * top)).astype(np.uint8))
    if img.mode == "F":
        img = _grey8(img, lambda a: np.clip(a * 255.0 + 0.5, 0, 255).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA", "P") or (img.mode in ("RGB", "L") and "transparency" in img.info):
        return _on_white(img)
    return img.convert("RGB") if img.mode != "RGB" else img


def resize_shorter(img: Image.Image, size: int) -> Image.Image:
    """Resize so the shorter side is ``size`` (torchvision's rounding), PIL bicubic."""
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    if short == size:
        return img
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    return img.resize((new_w, new_h), Image.BICUBIC)


def _crop(img: Image.Image, left: int, top: int, size: int) -> Image.Image:
    return img.crop((left, top, left + size, top + size))


def center_crop(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    return _crop(img, int(round((w - size) / 2.0)), int(round((h - size) / 2.0)), size)


def five_crops(img: Image.Image, size: int) -> list[Image.Image]:
    """Top-left, top-right, bottom-left, bottom-right, center (torchvision FiveCrop order)."""
    w, h = img.size
    return [
        _crop(img, 0, 0, size),
        _crop(img, w - size, 0, size),
        _crop(img, 0, h - size, size),
        _crop(img, w - size, h - size, size),
        center_crop(img, size),
    ]


def _hflip(img: Image.Image) -> Image.Image:
    return img.transpose(Image.FLIP_LEFT_RIGHT)


@dataclass(frozen=True)
class ImageTransform:
    """PIL image -> uint8 array [V,3,R,R] for the chosen views."""

    resolution: int = 256
    views: str = "center"

    def __post_init__(self) -> None:
        if self.views not in VIEWS:
            raise ValueError(f"views must be one of {sorted(VIEWS)}, not {self.views!r}")
        if self.resolution < 8:
            raise ValueError(f"resolution must be >= 8, not {self.resolution}")

    @property
    def num_views(self) -> int:
        return VIEWS[self.views]

    @property
    def resize_side(self) -> int:
        """The shorter side images are resized to before cropping."""
        return int(round(self.resolution * TENCROP_SCALE)) if self.views == "tencrop" else self.resolution

    def crops(self, img: Image.Image) -> list[Image.Image]:
        img = to_rgb(img)
        r = self.resolution
        if self.views == "tencrop":
            five = five_crops(resize_shorter(img, self.resize_side), r)
            return five + [_hflip(c) for c in five]
        crop = center_crop(resize_shorter(img, r), r)
        return [crop, _hflip(crop)] if self.views == "flip" else [crop]

    def __call__(self, img: Image.Image) -> np.ndarray:
        return np.stack([np.asarray(c, dtype=np.uint8).transpose(2, 0, 1) for c in self.crops(img)])

    def describe(self) -> dict:
        """What the output metadata records about this transform."""
        return {
            "resolution": self.resolution,
            "views": self.views,
            "num_views": self.num_views,
            "resize": "shorter side, PIL bicubic antialiased",
            "crop": "center" if self.views != "tencrop" else f"five crops + flips of {TENCROP_SCALE}x",
            "scale": "uint8 / 255",
        }
