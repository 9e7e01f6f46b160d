"""Image grids for the PNGs the jobs write (samples, contact sheets)."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float [B,3,H,W] in ~[0,1] -> uint8 [B,H,W,3] (clamped, rounded)."""
    return images.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def image_grid(images: np.ndarray, columns: int, pad: int = 2) -> Image.Image:
    """uint8 [B,H,W,3], row-major, on a white background with ``pad`` pixels between cells."""
    b, h, w, _ = images.shape
    rows = -(-b // columns)
    grid = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, 3), 255, np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, columns)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        grid[y : y + h, x : x + w] = img
    return Image.fromarray(grid)
