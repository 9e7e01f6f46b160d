"""Encoded image bytes -> upright RGB -> transform views, or a recorded skip with its reason.

Exactness first: images are decoded at full size by default, so the views are exactly
``ImageTransform`` of the full image. ``fast=True`` (``--fast-decode``) lets the JPEG decoder
downscale in the DCT domain (``Image.draft``, by 2, 4 or 8) when the original is at least twice the
transform's resize target; the views then differ slightly from the exact ones. Truncated files are errors (Pillow's
``LOAD_TRUNCATED_IMAGES`` stays off). Pillow's own decompression-bomb limit
(``Image.MAX_IMAGE_PIXELS``) still applies above ``max_pixels``. Only formats in
``IMAGE_FORMATS`` are opened.

Only image-content errors become skips: an exception raised inside Pillow while it opens,
decodes or converts the bytes. ``MemoryError`` and anything raised elsewhere propagate, so the
shard attempt fails and is retried instead of losing the row.
"""
from __future__ import annotations

import io
import re

from PIL import Image

from pipeline.records import DecodedImage, Record, SkippedRecord
from tokenizer.transform import EXIF_ORIENTATION, ImageTransform, to_rgb

DEFAULT_MAX_PIXELS = 1 << 26  # 8192 x 8192
# Pillow plugins allowed to open input bytes (the formats of IMAGE_EXTENSIONS / webdataset suffixes).
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")

# Skip reasons (prefixes; details follow after ": ").
NO_IMAGE = "no image"
EMPTY_IMAGE = "empty image"
TOO_LARGE = "image too large"
UNDECODABLE = "undecodable image"

_OBJECT_REPR = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")
_MAX_DETAIL = 200


def _detail(e: Exception) -> str:
    """``Class: message`` without per-process object addresses, so reasons are reproducible."""
    return f"{type(e).__name__}: {_OBJECT_REPR.sub('<bytes>', str(e))}"[:_MAX_DETAIL]


def raised_by_pillow(e: BaseException) -> bool:
    """True when the innermost Python frame of ``e``'s traceback is Pillow code."""
    tb = e.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return str(tb.tb_frame.f_globals.get("__name__", "")).startswith("PIL.")


_TRANSPOSED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def _draft(img: Image.Image, transform: ImageTransform) -> None:
    """Let the JPEG decoder downscale by a power of two while the shorter side stays >= the
    transform's resize target (only when the original is at least twice that target)."""
    if img.format != "JPEG":
        return
    target, (w, h) = transform.resize_side, img.size
    short = min(w, h)
    if short >= 2 * target:
        img.draft(None, (-(-w * target // short), -(-h * target // short)))


def decode_record(
    record: Record, transform: ImageTransform, max_pixels: int = DEFAULT_MAX_PIXELS, fast: bool = False
) -> DecodedImage | SkippedRecord:
    """Decode, convert to upright 8-bit RGB and apply ``transform``; width/height are the upright
    original size (also with ``fast``, see the module docstring). Missing, empty, refused by the reader, oversized (> ``max_pixels``, checked
    from the header before decoding) or undecodable images become a ``SkippedRecord``."""
    if record.skip_reason is not None:
        return SkippedRecord(record.key, record.skip_reason)
    if record.image is None:
        return SkippedRecord(record.key, NO_IMAGE)
    if not record.image:
        return SkippedRecord(record.key, EMPTY_IMAGE)
    try:
        with Image.open(io.BytesIO(record.image), formats=IMAGE_FORMATS) as img:
            if img.width * img.height > max_pixels:
                return SkippedRecord(record.key, f"{TOO_LARGE}: {img.width}x{img.height}")
            size = img.size[::-1] if img.getexif().get(EXIF_ORIENTATION, 1) in _TRANSPOSED else img.size
            if fast:
                _draft(img, transform)
            img.load()
            upright = to_rgb(img)
            views = transform(upright)
    except Image.DecompressionBombError as e:
        return SkippedRecord(record.key, f"{TOO_LARGE}: {e}")
    except MemoryError:
        raise
    except Exception as e:
        if isinstance(e, Image.UnidentifiedImageError) or raised_by_pillow(e):
            return SkippedRecord(record.key, f"{UNDECODABLE}: {_detail(e)}")
        raise
    return DecodedImage(
        key=record.key,
        views=views,
        width=size[0],
        height=size[1],
        label=record.label,
        caption=record.caption,
        extra=record.extra,
    )
