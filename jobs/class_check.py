"""Do generated images show their class? A nearest-centroid classifier on colour and shape
features, fitted on real sample images, applied to generated ones.

Features of an image: a hue histogram of its vivid pixels (the object; backgrounds are muted),
the fraction of vivid pixels (object area) and the spread of their positions (elongation). Each
feature is standardised with the real images' statistics.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

HUE_BINS = 12
VIVID_SATURATION = 0.45
VIVID_VALUE = 0.4


def _hsv(images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """uint8 [B,H,W,3] -> hue, saturation, value in [0,1], each [B,H,W]."""
    rgb = images.astype(np.float32) / 255
    top, low = rgb.max(-1), rgb.min(-1)
    span = np.where(top > low, top - low, 1.0)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    hue = np.where(top == r, (g - b) / span, np.where(top == g, 2 + (b - r) / span, 4 + (r - g) / span))
    hue = (hue / 6) % 1.0
    saturation = np.where(top > 0, (top - low) / np.where(top > 0, top, 1), 0)
    return hue, saturation, top


def features(images: np.ndarray) -> np.ndarray:
    """uint8 [B,H,W,3] -> float [B, HUE_BINS + 3]."""
    hue, sat, val = _hsv(images)
    vivid = (sat >= VIVID_SATURATION) & (val >= VIVID_VALUE)
    b, h, w = vivid.shape
    bins = np.minimum((hue * HUE_BINS).astype(int), HUE_BINS - 1)
    hist = np.zeros((b, HUE_BINS), np.float32)
    for i in range(b):
        hist[i] = np.bincount(bins[i][vivid[i]], minlength=HUE_BINS)
    count = vivid.reshape(b, -1).sum(1).astype(np.float32)
    hist /= np.maximum(count, 1)[:, None]
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    shape = np.zeros((b, 2), np.float32)
    for i in range(b):
        if count[i] >= 2:
            cov = np.cov(np.stack([xx[vivid[i]], yy[vivid[i]]]))
            ev = np.linalg.eigvalsh(cov)
            shape[i] = np.sqrt(np.maximum(ev, 0))  # minor and major spread of the object
    return np.concatenate([hist, (count / (h * w))[:, None], shape], 1)


@dataclass(frozen=True)
class NearestCentroid:
    centroids: np.ndarray   # [K, F], standardised feature space
    mean: np.ndarray        # [F]
    scale: np.ndarray       # [F]

    @classmethod
    def fit(cls, images: np.ndarray, labels: np.ndarray) -> "NearestCentroid":
        f = features(images)
        mean, scale = f.mean(0), f.std(0) + 1e-3
        z = (f - mean) / scale
        classes = np.unique(labels)
        if not np.array_equal(classes, np.arange(len(classes))):
            raise ValueError(f"labels must be 0..K-1 with every class present, got {classes.tolist()}")
        return cls(np.stack([z[labels == c].mean(0) for c in classes]), mean, scale)

    def predict(self, images: np.ndarray) -> np.ndarray:
        z = (features(images) - self.mean) / self.scale
        return ((z[:, None] - self.centroids[None]) ** 2).sum(-1).argmin(1)

    def accuracy(self, images: np.ndarray, labels: np.ndarray) -> float:
        return float((self.predict(images) == np.asarray(labels)).mean())
