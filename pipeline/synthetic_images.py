"""The demo's sample images: 4 classes, each with several shapes, colours and textures, on varied
backgrounds, 64 px. Deterministic for a seed.

A class is a colour family plus a shape family (``CLASSES``); within it every image draws one of
the class's shapes, a hue from its range, a texture, a position and size, and one of the shared
backgrounds (whose colours are muted, so the object's colour names the class). Edges are
antialiased (rendered at 2x, box-downsampled) and noise is light, so a small tokenizer can
reconstruct them well.
"""
from __future__ import annotations

import colorsys
import io
import json
import tarfile
from dataclasses import dataclass

import numpy as np
from PIL import Image

from pipeline.layout import filesystem

SIZE = 64
SUPERSAMPLE = 2
NOISE = 2.0  # pixel noise sigma, in 0..255 units


@dataclass(frozen=True)
class ClassStyle:
    name: str
    hues: tuple[float, float]     # hue range (0..1, may wrap past 1)
    shapes: tuple[str, ...]


CLASSES = (
    ClassStyle("warm_round", (0.97, 1.10), ("disk", "ring", "ellipse")),
    ClassStyle("green_pointed", (0.25, 0.38), ("triangle", "cross", "star")),
    ClassStyle("blue_square", (0.55, 0.66), ("square", "diamond", "frame")),
    ClassStyle("purple_bars", (0.76, 0.88), ("bars", "hbar", "vbar")),
)
TEXTURES = ("solid", "stripes", "gradient", "dots")
BACKGROUNDS = ("flat", "gradient", "waves", "split")


def class_name(label: int) -> str:
    return f"{label:03d}_{CLASSES[label].name}"


def caption(label: int) -> str:
    style = CLASSES[label]
    return f"a {style.name.replace('_', ' ')} shape on a muted background"


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean mask of a shape in object coordinates (the shape spans about [-1, 1])."""
    r, au, av = np.hypot(u, v), np.abs(u), np.abs(v)
    if shape == "disk":
        return r <= 1
    if shape == "ring":
        return (r <= 1) & (r >= 0.55)
    if shape == "ellipse":
        return np.hypot(u, v * 1.8) <= 1
    if shape == "triangle":
        return (v <= 0.8) & (v >= 1.9 * au - 1.0)
    if shape == "cross":
        return ((au <= 0.3) & (av <= 1)) | ((av <= 0.3) & (au <= 1))
    if shape == "star":
        angle = np.arctan2(v, u)
        return r <= 0.55 + 0.45 * np.abs(np.cos(2.5 * angle))
    if shape == "square":
        return np.maximum(au, av) <= 0.85
    if shape == "diamond":
        return au + av <= 1.1
    if shape == "frame":
        return (np.maximum(au, av) <= 0.9) & (np.maximum(au, av) >= 0.55)
    if shape == "bars":
        return (au <= 1) & (av <= 0.9) & (np.floor((u + 1) * 2.5) % 2 == 0)
    if shape == "hbar":
        return (au <= 1.1) & (av <= 0.35)
    if shape == "vbar":
        return (au <= 0.35) & (av <= 1.1)
    raise ValueError(f"unknown shape {shape!r}")


def _rgb(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v))


def _background(kind: str, x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Muted background [H,W,3] in 0..1 over unit coordinates x, y."""
    hue = rng.uniform()
    a, b = _rgb(hue, rng.uniform(0, 0.25), rng.uniform(0.15, 0.45)), _rgb(hue + 0.5, rng.uniform(0, 0.25),
                                                                            rng.uniform(0.15, 0.45))
    if kind == "flat":
        t = np.zeros_like(x)
    elif kind == "gradient":
        angle = rng.uniform(0, 2 * np.pi)
        t = np.clip(0.5 + (np.cos(angle) * (x - 0.5) + np.sin(angle) * (y - 0.5)), 0, 1)
    elif kind == "waves":
        fx, fy, phase = rng.uniform(0.5, 2.0), rng.uniform(0.5, 2.0), rng.uniform(0, 2 * np.pi)
        t = 0.5 + 0.5 * np.sin(2 * np.pi * (fx * x + fy * y) + phase)
    else:  # split: two halves, soft edge
        edge = rng.uniform(0.3, 0.7)
        t = 1 / (1 + np.exp(-(x - edge) * 40)) if rng.uniform() < 0.5 else 1 / (1 + np.exp(-(y - edge) * 40))
    return a * (1 - t[..., None]) + b * t[..., None]


def _texture(kind: str, x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Brightness multiplier [H,W] (about 0.7..1) for the object's colour."""
    if kind == "solid":
        return np.ones_like(x)
    if kind == "stripes":
        angle, period = rng.uniform(0, np.pi), rng.uniform(0.12, 0.2)
        s = np.cos(angle) * x + np.sin(angle) * y
        return 0.85 + 0.15 * np.sin(2 * np.pi * s / period)
    if kind == "gradient":
        angle = rng.uniform(0, 2 * np.pi)
        return 0.85 + 0.3 * (np.cos(angle) * (x - 0.5) + np.sin(angle) * (y - 0.5))
    period = rng.uniform(0.14, 0.2)  # dots
    return 0.8 + 0.2 * (np.cos(2 * np.pi * x / period) * np.cos(2 * np.pi * y / period) > 0.3)


def render(label: int, rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
    """One RGB image of class ``label`` as uint8 [size, size, 3]."""
    style = CLASSES[label]
    n = size * SUPERSAMPLE
    y, x = (np.mgrid[0:n, 0:n] + 0.5) / n
    bg = _background(BACKGROUNDS[rng.integers(len(BACKGROUNDS))], x, y, rng)
    shape = style.shapes[rng.integers(len(style.shapes))]
    cx, cy = rng.uniform(0.32, 0.68, 2)
    radius = rng.uniform(0.2, 0.3)
    angle = rng.uniform(-0.4, 0.4)
    du, dv = (x - cx) / radius, (y - cy) / radius
    u, v = np.cos(angle) * du + np.sin(angle) * dv, -np.sin(angle) * du + np.cos(angle) * dv
    mask = _shape_mask(shape, u, v)[..., None]
    colour = _rgb(rng.uniform(*style.hues), rng.uniform(0.7, 1.0), rng.uniform(0.8, 1.0))
    fg = colour * _texture(TEXTURES[rng.integers(len(TEXTURES))], x, y, rng)[..., None]
    pixels = np.where(mask, np.clip(fg, 0, 1), bg) * 255
    small = _downsample(pixels, SUPERSAMPLE)
    return np.clip(small + rng.normal(0, NOISE, small.shape) + 0.5, 0, 255).astype(np.uint8)


def _downsample(pixels: np.ndarray, factor: int) -> np.ndarray:
    h, w, c = pixels.shape
    return pixels.reshape(h // factor, factor, w // factor, factor, c).mean((1, 3))


def sample_images(count: int, seed: int, size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    """``count`` images uint8 [count, size, size, 3] with labels cycling through the classes."""
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % len(CLASSES)
    return np.stack([render(int(c), rng, size) for c in labels]), labels


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, "PNG")
    return buf.getvalue()


def write_samples(url: str, num_shards: int, images_per_shard: int, seed: int = 0,
                  storage_options: dict | None = None) -> list[str]:
    """Write ``num_shards`` webdataset tars ``{s:05d}.tar`` of sample images (lossless PNG, with
    ``.cls`` label, ``.txt`` caption, ``.json`` size) under ``url``; returns the shard paths."""
    pixels, labels = sample_images(num_shards * images_per_shard, seed)
    fs, root = filesystem(url, storage_options)
    root = root.rstrip("/")
    fs.makedirs(root, exist_ok=True)
    files = {}
    for s in range(num_shards):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for i in range(s * images_per_shard, (s + 1) * images_per_shard):
                stem, label = f"{s:05d}{i:05d}", int(labels[i])
                members = {"png": _png(pixels[i]), "txt": caption(label).encode(), "cls": str(label).encode(),
                           "json": json.dumps({"key": stem, "width": SIZE, "height": SIZE}).encode()}
                for suffix, data in members.items():
                    info = tarfile.TarInfo(f"{stem}.{suffix}")
                    info.size, info.mode = len(data), 0o644
                    tar.addfile(info, io.BytesIO(data))
        files[f"{root}/{s:05d}.tar"] = buf.getvalue()
    fs.pipe(files)
    return sorted(files)
