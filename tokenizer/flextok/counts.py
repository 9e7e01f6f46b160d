"""Per-image token count of an ordered tokenizer (FlexTok): the shortest id prefix whose
reconstruction is close enough to the image.

For each image, the candidate prefix lengths (default 1, 2, 4, ..., N) are searched with a binary
search: decode the first k ids (rectified flow, fixed steps / guidance, seeded noise), take the
MSE against the image on the [0,1] scale (decode clamped to [0,1]), and keep the smallest k
found under the threshold; the last candidate (N) is the answer when none passes and is never
decoded. The search needs ceil(log2(#candidates)) decodes per image at most (3 for N=32, 4 for
N=256) instead of one per candidate. It returns the smallest passing candidate when the error
falls with k; when it does not, it still returns a passing k whose next smaller candidate failed,
and a looser threshold never yields a larger k (each comparison can only flip towards "pass").

The noise of an image comes from a generator seeded by (seed, image key), so the count of an
image does not depend on its batch, its position or the other images: reruns are identical.
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .model import FlexTok


def default_candidates(num_tokens: int) -> tuple[int, ...]:
    """Powers of two below ``num_tokens``, then ``num_tokens``."""
    return tuple(2**i for i in range(max(0, math.ceil(math.log2(num_tokens))))) + (num_tokens,)


@dataclass(frozen=True)
class TokenCountSettings:
    """How ``num_tokens_needed`` is computed (recorded in pretok.json)."""

    threshold: float                 # MSE on the [0,1] scale
    candidates: tuple[int, ...]      # strictly increasing prefix lengths; the last is the fallback
    timesteps: int = 20
    guidance_scale: float = 7.5
    perform_norm_guidance: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.threshold) and self.threshold > 0):
            raise ValueError(f"token-count MSE threshold must be a positive number, not {self.threshold}")
        c = self.candidates
        if not c or c[0] < 1 or any(a >= b for a, b in zip(c, c[1:])):
            raise ValueError(f"candidates must be strictly increasing and >= 1, not {c}")
        if self.timesteps < 1:
            raise ValueError(f"timesteps must be >= 1, not {self.timesteps}")

    @classmethod
    def for_num_tokens(cls, num_tokens: int, threshold: float, **decode) -> "TokenCountSettings":
        return cls(threshold, default_candidates(num_tokens), **decode)

    @property
    def max_decodes(self) -> int:
        """Most decodes one image needs."""
        return math.ceil(math.log2(len(self.candidates)))

    def describe(self) -> dict:
        """The pretok.json record (JSON types only, so it compares equal after a round trip)."""
        return {
            "column": "num_tokens_needed",
            "threshold_mse": self.threshold,
            "candidates": list(self.candidates),
            "timesteps": self.timesteps,
            "guidance_scale": self.guidance_scale,
            "perform_norm_guidance": self.perform_norm_guidance,
            "seed": self.seed,
            "image": "view 0, [0,1] scale; decode clamped to [0,1]",
            "search": "binary search over candidates; the last candidate when none is under the threshold",
        }


@dataclass(frozen=True)
class TokenCounts:
    """What ``count_tokens`` found for a batch."""

    counts: np.ndarray    # int32 [B], values in the candidate set
    decodes: np.ndarray   # int32 [B], decodes each image took


def _image_seed(seed: int, key: str) -> int:
    digest = hashlib.sha256(f"{seed}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def image_noise(keys: Sequence[str], seed: int, shape: tuple[int, int, int]) -> torch.Tensor:
    """Initial flow noise [B,*shape] (CPU, float32), one generator per image seeded by (seed, key)."""
    return torch.stack([
        torch.randn(shape, generator=torch.Generator().manual_seed(_image_seed(seed, k))) for k in keys
    ])


def noise_shape(tok: FlexTok, image_size: int) -> tuple[int, int, int]:
    side = image_size // tok.cfg.vae.downsample_factor
    return (tok.cfg.vae.latent_channels, side, side)


def reconstruction_mse(
    tok: FlexTok, images: torch.Tensor, ids: torch.Tensor, noise: torch.Tensor, settings: TokenCountSettings,
    precision: str = "fp32",
) -> torch.Tensor:
    """Per-image MSE (float32 [B], CPU) between ``images`` [B,3,S,S] in [0,1] and the clamped
    decode of ``ids`` [B,k] from ``noise``."""
    device = tok.device
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        recon = tok.decode_tokens(
            ids, settings.timesteps, settings.guidance_scale, settings.perform_norm_guidance,
            image_size=images.shape[-1], noise=noise,
        )
    err = (recon.float().clamp(0.0, 1.0) - images.to(device).float()).square().mean(dim=(1, 2, 3))
    return err.cpu()


def count_tokens(
    tok: FlexTok, images: torch.Tensor, ids: torch.Tensor, keys: Sequence[str], settings: TokenCountSettings,
    precision: str = "fp32",
) -> TokenCounts:
    """Token count per image (see the module docstring). ``images`` float [B,3,S,S] in [0,1],
    ``ids`` [B,N] (all ids of the image), ``keys`` name the images (they seed the noise)."""
    if not tok.ordered or not tok.has_decoder:
        raise ValueError("token counts need an ordered tokenizer loaded with its decoder (FlexTok, parts='all')")
    cands = settings.candidates
    if cands[-1] != tok.num_tokens:
        raise ValueError(f"the last candidate must be the tokenizer's {tok.num_tokens} tokens, not {cands[-1]}")
    b = len(keys)
    if images.shape[0] != b or ids.shape != (b, tok.num_tokens):
        raise ValueError(f"{b} keys, images {tuple(images.shape)}, ids {tuple(ids.shape)} do not match")
    noise = image_noise(keys, settings.seed, noise_shape(tok, images.shape[-1]))
    lo, hi = np.zeros(b, np.int64), np.full(b, len(cands) - 1)
    decodes = np.zeros(b, np.int32)
    while (active := np.flatnonzero(lo < hi)).size:
        mid = (lo + hi) // 2
        for m in np.unique(mid[active]):
            group = active[mid[active] == m]
            rows = torch.from_numpy(group)
            err = reconstruction_mse(tok, images[rows], ids[rows, : cands[m]], noise[rows], settings, precision)
            passed = err.numpy() < settings.threshold
            hi[group[passed]] = m
            lo[group[~passed]] = m + 1
            decodes[group] += 1
    return TokenCounts(np.asarray(cands, np.int32)[hi], decodes)
