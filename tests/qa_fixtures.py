"""Fixtures of the QA and report tests: a small image folder of coloured squares, a TiTok trained
on such images (tests/data/qa_titok, made by ``python -m tests.qa_fixtures train``) and a corrupted
copy of it whose codebook values are shuffled."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from safetensors.numpy import load_file, save_file

QA_TITOK = Path(__file__).resolve().parent / "data" / "qa_titok"
CLASSES = ("small", "medium", "large")
PALETTE = np.array([[230, 60, 50], [40, 160, 70], [50, 80, 220], [240, 200, 40], [20, 20, 20], [235, 235, 235]],
                   np.uint8)
TRAIN_COMMAND = "python -m tests.qa_fixtures train"  # recorded in the checkpoint folder


def square_image(rng: np.random.Generator, cls: int, size: int = 32) -> np.ndarray:
    """uint8 [size,size,3]: a background colour and a square of another colour, its side set by the class."""
    bg, fg = rng.choice(len(PALETTE), 2, replace=False)
    a = np.empty((size, size, 3), np.uint8)
    a[:] = PALETTE[bg]
    half = (3, 5, 7)[cls] * size // 32
    cy, cx = size // 2 + rng.integers(-4, 5, 2) * size // 32
    a[cy - half:cy + half, cx - half:cx + half] = PALETTE[fg]
    return a


def write_squares(root: str | Path, per_class: int, seed: int) -> dict[str, int]:
    """An image folder ``root/{class}/{i}.png``; returns relative path -> class index."""
    rng = np.random.default_rng(seed)
    labels = {}
    for c, name in enumerate(CLASSES):
        (Path(root) / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            rel = f"{name}/{i:04d}.png"
            Image.fromarray(square_image(rng, c)).save(Path(root) / rel)
            labels[rel] = c
    return labels


def shuffled_codebook(src: str | Path, dest: str | Path, seed: int = 0) -> Path:
    """A copy of the TiTok checkpoint ``src`` whose codebook values are permuted at random (a wrong
    checkpoint: the encoder's latents and the decoder no longer meet the codes). Permuting whole
    rows would only relabel the ids, which an encode-decode round trip cannot see."""
    src, dest = Path(src), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "config.json", dest / "config.json")
    weights = load_file(str(src / "model.safetensors"))
    key = "quantize.embedding.weight"
    flat = weights[key].reshape(-1)
    weights[key] = flat[np.random.default_rng(seed).permutation(flat.size)].reshape(weights[key].shape)
    save_file(weights, str(dest / "model.safetensors"))
    return dest


def train(dest: Path = QA_TITOK) -> dict:
    """Train the fixture tokenizer (once; its weights are committed)."""
    import tempfile

    import torch

    from jobs.train_tokenizer import train_tokenizer

    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        write_squares(tmp, per_class=200, seed=1234)
        summary = train_tokenizer(tmp, str(dest), image_size=32, patch=8, tokens=16, codebook=64, width=64,
                                  depth=2, steps=1200, batch_size=32, lr=1e-3, seed=0)
    (dest / "HOW_MADE.md").write_text(
        f"Trained by `{TRAIN_COMMAND}` (seed 0, 600 images of write_squares(seed=1234), jobs.train_tokenizer "
        f"as of the commit adding it). Summary: {json.dumps(summary)}\n")
    return summary


if __name__ == "__main__":
    if sys.argv[1:] != ["train"]:
        raise SystemExit(f"usage: {TRAIN_COMMAND}")
    print(json.dumps(train(), indent=1))
