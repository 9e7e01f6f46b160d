"""Quality checks during pretokenization: decode the tokens of every K-th image and compare.

Row ``w`` of a shard (counting written rows in shard order) is checked iff ``w % K == 0``, so every
shard is checked at least once and the choice does not depend on timing, batch cuts or retries.
The check decodes view 0's ids with the tokenizer's own decoder (FlexTok: the full id sequence,
the official 20 steps / guidance 7.5, noise seeded by the image key) and records the PSNR against
that input view on the [0,1] scale (decode clamped), plus a small thumbnail pair for the report's
contact sheet. Tokens are never changed. A tokenizer that cannot decode (TiTok stage-1) records
why, once per shard, and the shard commits as usual.

The thumbnails of a shard go to ``stats/{shard}.qa.png`` (rows of original | reconstruction),
written before the stats file, so a shard's thumbnails exist whenever it counts as done.
"""
from __future__ import annotations

import io
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from tokenizer.base import ImageTokenizer

from .layout import OutputLayout
from .records import DecodedImage
from .writer import write_bytes_atomic

DEFAULT_QA_EVERY = 1000
# Mean PSNR below this is flagged. Unrelated pixels score far less: a flat image of each photo's own
# mean colour gets about 11-13 dB on natural images (per-image pixel variance 0.05-0.08 on [0,1]),
# and a tokenizer with a shuffled codebook decodes the test fixture's simple squares to 12-14 dB
# (17+ with the right codebook). Tokenizers with very few tokens can sit near 15-16 dB on photos:
# lower it with --qa-min-psnr for those.
DEFAULT_QA_MIN_PSNR = 15.0
THUMB_SIDE = 64          # thumbnails are at most this many pixels a side
THUMBS_PER_SHARD = 8     # pairs kept for the contact sheet, per shard
MAX_PSNR = 100.0         # an exact reconstruction (MSE 0) is recorded as this
FLEXTOK_QA_SEED = 0      # seed of the per-image decode noise (with the image key)
LIKELY_CAUSES = (
    "a wrong checkpoint (another model's weights or a corrupted codebook/decoder)",
    "a wrong resolution (--resolution other than the one the tokenizer was trained at)",
    "a wrong normalisation (the tokenizer expects another input range or mean/std than [0,1] RGB)",
)


def psnr(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB (float32 [B], CPU) on the [0,1] scale; ``recon`` is clamped first."""
    mse = (recon.float().clamp(0.0, 1.0) - target.float()).square().flatten(1).mean(1)
    return (10 * torch.log10(1 / mse.clamp_min(10 ** (-MAX_PSNR / 10)))).cpu()


def decode_ids(tok: ImageTokenizer, ids: torch.Tensor, keys: list[str], image_size: int,
               precision: str = "fp32") -> torch.Tensor:
    """Decode ids [B,N] (all of them) -> float [B,3,S,S] on the tokenizer's device."""
    with torch.inference_mode(), torch.autocast(tok.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        if tok.family == "flextok":
            from tokenizer.flextok.counts import image_noise, noise_shape

            noise = image_noise(keys, FLEXTOK_QA_SEED, noise_shape(tok, image_size))
            return tok.decode_tokens(ids, image_size=image_size, noise=noise)
        return tok.decode_tokens(ids)


def _thumb(view: np.ndarray) -> np.ndarray:
    """uint8 [3,R,R] -> uint8 [T,T,3], T = min(R, THUMB_SIDE) (area-averaged)."""
    img = Image.fromarray(np.ascontiguousarray(view.transpose(1, 2, 0)))
    side = min(img.width, THUMB_SIDE)
    return np.asarray(img.resize((side, side), Image.Resampling.BOX) if side != img.width else img)


@dataclass
class ShardQA:
    """The QA of one shard in progress: ``check`` after each device encode, then ``fields`` for
    its stats and ``save_thumbnails`` before the commit."""

    tok: ImageTokenizer
    every: int = DEFAULT_QA_EVERY
    precision: str = "fp32"
    keys: list[str] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    thumbs: list[np.ndarray] = field(default_factory=list)   # [T,2T,3] original | reconstruction
    seconds: float = 0.0
    unavailable: str | None = field(init=False, default=None)
    _rows: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.unavailable = self.tok.decode_unavailable if self.every > 0 else None

    def check(self, images: list[DecodedImage], tokens: np.ndarray) -> None:
        """QA the due rows of one encoded batch (``tokens`` uint16 [B,V,N], not modified)."""
        start, self._rows = self._rows, self._rows + len(images)
        if self.every <= 0 or self.unavailable is not None:
            return
        due = [j for j in range(len(images)) if (start + j) % self.every == 0]
        if not due:
            return
        t0 = time.perf_counter()
        views = np.stack([images[j].views[0] for j in due])
        keys = [images[j].key for j in due]
        target = torch.from_numpy(views).to(self.tok.device).float().div_(255.0)
        ids = torch.from_numpy(tokens[due, 0].astype(np.int64)).to(self.tok.device)
        recon = decode_ids(self.tok, ids, keys, views.shape[-1], self.precision).float()
        values = psnr(recon, target)
        self.keys += keys
        self.values += [round(float(v), 3) for v in values]
        room = THUMBS_PER_SHARD - len(self.thumbs)
        if room > 0:
            rec8 = (recon[:room].clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
            self.thumbs += [np.concatenate([_thumb(v), _thumb(r)], axis=1) for v, r in zip(views[:room], rec8)]
        self.seconds += time.perf_counter() - t0

    def fields(self) -> dict:
        """The ShardStats fields of this QA."""
        return {"qa_every": max(0, self.every), "qa_keys": self.keys, "qa_psnr": self.values,
                "qa_unavailable": self.unavailable, "qa_thumbnails": len(self.thumbs),
                "qa_seconds": round(self.seconds, 3)}

    def save_thumbnails(self, layout: OutputLayout, index: int, storage_options: dict | None = None) -> None:
        """Write ``stats/{shard}.qa.png`` (atomic); call before the shard's stats are written."""
        if self.thumbs:
            write_bytes_atomic(layout.qa_path(index), thumbnails_png(self.thumbs), storage_options, layout.tmp_dir)


def thumbnails_png(pairs: list[np.ndarray]) -> bytes:
    """Pairs [T,2T,3] stacked top to bottom as one PNG."""
    side = max(p.shape[0] for p in pairs)
    canvas = np.zeros((side * len(pairs), 2 * side, 3), np.uint8)
    for i, p in enumerate(pairs):
        canvas[i * side:i * side + p.shape[0], :p.shape[1]] = p
    buf = io.BytesIO()
    Image.fromarray(canvas).save(buf, format="PNG")
    return buf.getvalue()


def split_thumbnails(png: bytes, count: int) -> list[np.ndarray]:
    """The ``count`` pairs of a thumbnails PNG, each [T,2T,3]."""
    a = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    side = a.shape[0] // max(1, count)
    return [a[i * side:(i + 1) * side] for i in range(count)]


@dataclass(frozen=True)
class QASummary:
    """The PSNR distribution of the QA checks of a set of shards."""

    count: int
    mean: float | None
    p5: float | None
    p50: float | None
    p95: float | None
    every: tuple[int, ...]               # the K values the shards were written with
    unavailable: tuple[str, ...] = ()    # distinct reasons why some shards could not be checked
    seconds: float = 0.0                 # decode time spent on QA

    @classmethod
    def of(cls, shards: Iterable) -> "QASummary":
        shards = list(shards)
        values = np.asarray([v for s in shards for v in s.qa_psnr], np.float64)
        pct = np.percentile(values, [5, 50, 95]) if values.size else [None] * 3
        r = (lambda x: None if x is None else round(float(x), 2))
        return cls(int(values.size), r(values.mean()) if values.size else None, *(r(p) for p in pct),
                   tuple(sorted({s.qa_every for s in shards})),
                   tuple(sorted({s.qa_unavailable for s in shards if s.qa_unavailable})),
                   round(sum(s.qa_seconds for s in shards), 3))

    def describe(self) -> str:
        if self.count == 0:
            if self.unavailable:
                return "unavailable: " + "; ".join(self.unavailable)
            return "off" if self.every in ((), (0,)) else "no image checked"
        return (f"{self.count} images decoded back: PSNR mean {self.mean:.2f} dB "
                f"(p5 {self.p5:.2f}, p50 {self.p50:.2f}, p95 {self.p95:.2f})")

    def warning(self, min_psnr: float) -> str | None:
        """A loud message when the mean PSNR is below ``min_psnr``; None otherwise."""
        if self.mean is None or not math.isfinite(min_psnr) or self.mean >= min_psnr:
            return None
        causes = "\n".join(f"  - {c}" for c in LIKELY_CAUSES)
        return (f"QA WARNING: the tokens decode back badly: mean PSNR {self.mean:.2f} dB over {self.count} images "
                f"is below {min_psnr:g} dB. The tokens are probably useless for training. Likely causes:\n{causes}\n"
                f"See the QA contact sheet in the run report.")
