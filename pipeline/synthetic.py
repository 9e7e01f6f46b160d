"""Small, learnable synthetic image datasets in every input format, optionally with bad images.

Each class has its own shape and hue (with random position, scale, colour and noise jitter), so a
tiny tokenizer and generator can learn them. Output is deterministic for a seed and is written
through fsspec, so ``s3://`` URLs work.
"""
from __future__ import annotations

import colorsys
import functools
import io
import json
import tarfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipeline.decode import EMPTY_IMAGE, NO_IMAGE, TOO_LARGE, UNDECODABLE
from pipeline.layout import filesystem
from pipeline.records import FORMATS

SHAPES = ("disk", "square", "ring", "hstripes", "vstripes", "checker", "cross", "diagonal")
HUE_NAMES = ("red", "yellow", "green", "cyan", "blue", "magenta")
DEFAULT_SIZES = ((64, 64), (80, 64), (64, 96))
ROW_GROUP_ROWS = 32  # small row groups, like Hugging Face image shards, so readers can stream
HUGE_SIZE = (20000, 20000)
EXIF_ORIENTATION = 0x0112

# Bad kinds and what decoding must make of them: a skip-reason prefix, or None (converted to RGB).
BAD_KINDS: dict[str, str | None] = {
    "corrupt": f"{UNDECODABLE}: UnidentifiedImageError",
    "truncated": f"{UNDECODABLE}: OSError",
    "not_image": f"{UNDECODABLE}: UnidentifiedImageError",
    "empty": EMPTY_IMAGE,
    "huge": TOO_LARGE,
    "no_image": NO_IMAGE,      # webdataset: no image member; parquet: null image bytes
    "cmyk": None,
    "gray16": None,
    "exif_rotated": None,      # stored sideways with EXIF orientation 6
    "palette_alpha": None,
}


@dataclass(frozen=True)
class BadItem:
    """What ``decode_record`` must produce for one deliberately odd item."""

    kind: str
    reason: str | None               # expected skip-reason prefix; None when it converts to a row
    size: tuple[int, int] | None     # expected upright (width, height) when it converts


@dataclass(frozen=True)
class SyntheticDataset:
    """What ``write_synthetic`` wrote, as ``list_source``/``iter_records`` should report it."""

    url: str
    format: str
    shard_keys: tuple[tuple[str, ...], ...]  # per input shard, in read order
    label_names: tuple[str, ...]
    labels: dict[str, int]                    # key -> label
    captions: dict[str, str]                  # key -> caption (empty for imagefolder)
    bad: dict[str, BadItem]                   # key -> expectation

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(k for shard in self.shard_keys for k in shard)

    @property
    def bad_counts(self) -> dict[str, int]:
        return dict(Counter(item.kind for item in self.bad.values()))


@dataclass(frozen=True)
class _Item:
    stem: str
    label: int
    data: bytes | None
    ext: str
    size: tuple[int, int]
    bad: BadItem | None = None


def _style(label: int) -> tuple[str, float]:
    """(shape, hue) of a class; hues follow the golden ratio so neighbouring classes differ."""
    return SHAPES[label % len(SHAPES)], (label * 0.618034) % 1.0


def _hue_name(hue: float) -> str:
    return HUE_NAMES[int(hue * len(HUE_NAMES) + 0.5) % len(HUE_NAMES)]


def class_name(label: int) -> str:
    shape, hue = _style(label)
    return f"{label:03d}_{_hue_name(hue)}_{shape}"


def caption(label: int) -> str:
    shape, hue = _style(label)
    return f"a {_hue_name(hue)} {shape} on a dark background"


def _mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    box = (np.abs(u) <= 1) & (np.abs(v) <= 1)
    bands = {
        "hstripes": np.floor((v + 1) * 2),
        "vstripes": np.floor((u + 1) * 2),
        "diagonal": np.floor((u + v + 2) * 1.5),
    }
    if shape in bands:
        return box & (bands[shape] % 2 == 0)
    radius = np.hypot(u, v)
    return {
        "disk": radius <= 1,
        "square": box & (np.maximum(np.abs(u), np.abs(v)) <= 0.85),
        "ring": (radius >= 0.55) & (radius <= 1),
        "checker": box & ((np.floor((u + 1) * 2) + np.floor((v + 1) * 2)) % 2 == 0),
        "cross": ((np.abs(u) <= 0.3) & box) | ((np.abs(v) <= 0.3) & box),
    }[shape]


def render(label: int, size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """An RGB image of class ``label``: its shape in its hue over a dark noisy background."""
    w, h = size
    shape, hue = _style(label)
    cx, cy = rng.uniform(0.35, 0.65, 2)
    radius = rng.uniform(0.22, 0.32) * min(w, h)
    y, x = np.mgrid[0:h, 0:w]
    mask = _mask(shape, (x - cx * w) / radius, (y - cy * h) / radius)
    hue += rng.uniform(-0.03, 0.03)
    fg = np.array(colorsys.hsv_to_rgb(hue % 1.0, 0.85, rng.uniform(0.8, 1.0))) * 255
    bg = np.array(colorsys.hsv_to_rgb((hue + 0.5) % 1.0, 0.35, rng.uniform(0.2, 0.35))) * 255
    pixels = np.where(mask[..., None], fg, bg) + rng.normal(0, 10, (h, w, 3))
    return Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8), "RGB")


def _encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


@functools.cache
def _huge_png() -> bytes:
    """One-colour 1-bit PNG of ``HUGE_SIZE``: tiny on disk, far over any pixel limit."""
    return _encode(Image.new("1", HUGE_SIZE, 1), "PNG")


def _bad_payload(
    kind: str, label: int, size: tuple[int, int], rng: np.random.Generator
) -> tuple[bytes | None, str, tuple[int, int] | None]:
    """(bytes or None, extension, upright size when it converts) of one bad item."""
    if kind == "corrupt":
        return rng.bytes(2048), "jpg", None
    if kind == "truncated":
        jpeg = _encode(render(label, size, rng), "JPEG", quality=90)
        return jpeg[: len(jpeg) * 6 // 10], "jpg", None
    if kind == "not_image":
        return b"this is a text file, not an image\n" * 4, "jpg", None
    if kind == "empty":
        return b"", "jpg", None
    if kind == "huge":
        return _huge_png(), "png", None
    if kind == "no_image":
        return None, "jpg", None
    if kind == "cmyk":
        return _encode(render(label, size, rng).convert("CMYK"), "JPEG", quality=90), "jpg", size
    if kind == "gray16":
        grey = np.asarray(render(label, size, rng).convert("L"), np.uint16) * 257
        return _encode(Image.fromarray(grey), "PNG"), "png", size
    if kind == "exif_rotated":
        w, h = size
        upright = (w, h + h // 2) if w == h else size
        exif = Image.Exif()
        exif[EXIF_ORIENTATION] = 6  # viewers rotate 90 degrees clockwise
        stored = render(label, upright, rng).transpose(Image.Transpose.ROTATE_90)
        return _encode(stored, "JPEG", quality=90, exif=exif), "jpg", upright
    if kind == "palette_alpha":
        palette = render(label, size, rng).quantize(colors=16)
        return _encode(palette, "PNG", transparency=0), "png", size
    raise ValueError(f"unknown bad kind {kind!r}")


def _plan(
    num_shards: int,
    images_per_shard: int,
    num_classes: int,
    sizes: Sequence[tuple[int, int]],
    bad_kinds: Sequence[str],
    rng: np.random.Generator,
) -> list[list[_Item]]:
    """Items per shard: ``images_per_shard`` class images, then this shard's share of ``bad_kinds``."""
    shards = []
    n = 0
    for s in range(num_shards):
        items = []
        for i, kind in enumerate([None] * images_per_shard + list(bad_kinds[s::num_shards])):
            label, size = n % num_classes, sizes[n % len(sizes)]
            stem = f"{s:05d}{i:04d}"
            if kind is None:
                items.append(_Item(stem, label, _encode(render(label, size, rng), "JPEG", quality=90), "jpg", size))
            else:
                data, ext, upright = _bad_payload(kind, label, size, rng)
                items.append(_Item(stem, label, data, ext, upright or size, BadItem(kind, BAD_KINDS[kind], upright)))
            n += 1
        shards.append(items)
    return shards


def _tar(items: list[_Item], captions: bool) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for item in items:
            w, h = item.size
            members = {
                item.ext: item.data,
                "txt": caption(item.label).encode() if captions else None,
                "json": json.dumps({"key": item.stem, "width": w, "height": h}, sort_keys=True).encode(),
                "cls": str(item.label).encode(),
            }
            for suffix, data in members.items():
                if data is not None:
                    info = tarfile.TarInfo(f"{item.stem}.{suffix}")
                    info.size, info.mode = len(data), 0o644
                    tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _parquet(items: list[_Item], label_names: Sequence[str], captions: bool) -> bytes:
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    columns = {
        "image": pa.array([{"bytes": it.data, "path": f"{it.stem}.{it.ext}"} for it in items], image_type),
        "label": pa.array([it.label for it in items], pa.int64()),
    }
    features = {"image": {"_type": "Image"}, "label": {"names": list(label_names), "_type": "ClassLabel"}}
    if captions:
        columns["caption"] = pa.array([caption(it.label) for it in items], pa.string())
        features["caption"] = {"dtype": "string", "_type": "Value"}
    table = pa.table(columns).replace_schema_metadata({"huggingface": json.dumps({"info": {"features": features}})})
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=ROW_GROUP_ROWS)
    return buf.getvalue()


def _key(fmt: str, item: _Item, label_names: Sequence[str]) -> str:
    if fmt == "webdataset":
        return item.stem
    if fmt == "parquet":
        return f"{item.stem}.{item.ext}"
    return f"{label_names[item.label]}/{item.stem}.{item.ext}"


def write_synthetic(
    url: str,
    format: str,
    num_shards: int = 2,
    images_per_shard: int = 8,
    num_classes: int = 4,
    image_size: tuple[int, int] | Sequence[tuple[int, int]] = DEFAULT_SIZES,
    bad: bool = False,
    seed: int = 0,
    storage_options: dict | None = None,
    captions: bool = True,
) -> SyntheticDataset:
    """Write a dataset under ``url`` and describe it.

    Layouts: webdataset ``{shard:05d}.tar`` (img2dataset members ``.jpg .txt .json .cls``);
    parquet ``train-{i:05d}-of-{n:05d}.parquet`` (HF ``image`` struct, ``label`` int64, optional
    ``caption``, ClassLabel names in the ``huggingface`` metadata); imagefolder
    ``{class_name}/{stem}.{ext}`` (no captions; ``shard_keys`` is the sorted-path chunking that
    ``list_source(url, images_per_shard=images_per_shard)`` must produce). ``image_size`` is one
    (W, H) or several used in turn. ``bad=True`` appends one item of each ``BAD_KINDS`` kind
    (``no_image`` only where the format can express it), spread over the shards.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, not {format!r}")
    sizes = (image_size,) if isinstance(image_size[0], int) else tuple(image_size)
    kinds = [k for k in BAD_KINDS if bad and not (k == "no_image" and format == "imagefolder")]
    label_names = tuple(class_name(c) for c in range(num_classes))
    shards = _plan(num_shards, images_per_shard, num_classes, sizes, kinds, np.random.default_rng(seed))
    fs, root = filesystem(url, storage_options)
    root = root.rstrip("/")
    if format == "webdataset":
        files = {f"{root}/{s:05d}.tar": _tar(items, captions) for s, items in enumerate(shards)}
    elif format == "parquet":
        files = {
            f"{root}/train-{s:05d}-of-{num_shards:05d}.parquet": _parquet(items, label_names, captions)
            for s, items in enumerate(shards)
        }
    else:
        files = {f"{root}/{_key(format, it, label_names)}": it.data for items in shards for it in items}
    for folder in sorted({path.rpartition("/")[0] for path in files}):
        fs.makedirs(folder, exist_ok=True)
    fs.pipe(files)

    items = {_key(format, it, label_names): it for its in shards for it in its}
    keys = [[_key(format, it, label_names) for it in its] for its in shards]
    if format == "imagefolder":
        ordered = sorted(items)
        keys = [ordered[i:i + images_per_shard] for i in range(0, len(ordered), images_per_shard)]
    return SyntheticDataset(
        url=url,
        format=format,
        shard_keys=tuple(tuple(k) for k in keys),
        label_names=label_names,
        labels={k: it.label for k, it in items.items()},
        captions={k: caption(it.label) for k, it in items.items()} if captions and format != "imagefolder" else {},
        bad={k: it.bad for k, it in items.items() if it.bad},
    )
