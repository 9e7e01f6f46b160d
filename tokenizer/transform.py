"""The one image transform used by every path (pipeline, tests, demo, inspection).

Official TiTok preprocessing: RGB, resize the shorter side to R with PIL bicubic (antialiased),
center crop R x R, values / 255. Views multiply each image into V crops.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

VIEWS = {"center": 1, "flip": 2, "tencrop": 10}
TENCROP_SCALE = 1.1


def to_rgb(img: Image.Image) -> Image.Image:
    """Upright 8-bit RGB: EXIF orientation applied; grey, CMYK, palette, 16-bit converted;
    transparency composited on white."""
    img = ImageOps.exif_transpose(img)
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16/32-bit greyscale: scale the full range to 8 bits instead of clipping at 255.
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr * (255.0 / top) + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "F":
        img = Image.fromarray(np.clip(np.asarray(img) * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode in ("RGB", "L") and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
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

    def crops(self, img: Image.Image) -> list[Image.Image]:
        img = to_rgb(img)
        r = self.resolution
        if self.views == "tencrop":
            five = five_crops(resize_shorter(img, int(round(r * TENCROP_SCALE))), r)
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
