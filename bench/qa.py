"""Cost of the QA check (``--qa-every K``) against encoding.

Measured in one process on the same batch, best of --reps: ``encode_views`` (what every row costs)
and ``ShardQA.check`` with every row due (one decode + PSNR + thumbnail per image, what a checked
row adds). The cost of QA at K is (check / encode per image) / K, since a shard checks rows
0, K, 2K, ... (at least one per shard). Models: TiTok s128 and b64 at 256 px (released shapes,
random weights) and the tiny FlexTok fixture (64 px); the released FlexTok decode is taken from
the FLOP count in bench/RESULTS.md (bench/flextok_counts.py).

  python bench/qa.py [--batch 8] [--reps 3] [--threads 1] [--titok s128,b64]
"""
from __future__ import annotations

import argparse
import platform
import shutil
import sys
import tempfile
from datetime import date
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.encoder import CONFIGS  # noqa: E402
from bench.flextok_counts import best_of  # noqa: E402
from pipeline.encode import encode_views  # noqa: E402
from pipeline.qa import DEFAULT_QA_EVERY, ShardQA  # noqa: E402
from pipeline.records import DecodedImage  # noqa: E402
from tokenizer import build_tokenizer, load_tokenizer  # noqa: E402

FLEXTOK_REF = Path(__file__).resolve().parents[2] / "shared" / "reference" / "flextok"
RELEASED_FLEXTOK_DECODE_X_ENCODE = 79.9  # bench/RESULTS.md, d18_d28: one decode (20 steps + VAE) / encode FLOPs


def warm_best_of(fn, reps: int) -> float:
    fn()  # warm-up: kernels, allocator
    return best_of(fn, reps)


def images(n: int, size: int) -> list[DecodedImage]:
    rng = np.random.default_rng(0)
    return [DecodedImage(f"img{i}", rng.integers(0, 256, (1, 3, size, size), dtype=np.uint8), size, size)
            for i in range(n)]


def measure(name: str, tok, batch: int, reps: int) -> dict:
    tok = tok.eval().requires_grad_(False)
    imgs = images(batch, tok.image_size)
    tokens = encode_views(tok, imgs, "fp32")
    enc = warm_best_of(lambda: encode_views(tok, imgs, "fp32"), reps) / batch
    chk = warm_best_of(lambda: ShardQA(tok, every=1).check(imgs, tokens), reps) / batch
    return {"model": name, "encode_ms": 1e3 * enc, "check_ms": 1e3 * chk, "ratio": chk / enc}


def row(r: dict, k: int) -> None:
    print(f"| {r['model']} | {r['encode_ms']:.1f} | {r['check_ms']:.1f} | {r['ratio']:.2f}x | "
          f"{100 * r['ratio'] / k:.3f}% | {r['ratio']:.2f}% |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--titok", default="s128,b64", help="TiTok sizes (of bench/encoder.py's)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    k = DEFAULT_QA_EVERY
    print(f"Date {date.today()}, {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{a.threads} thread(s), batch {a.batch}, best of {a.reps}\n")
    print(f"| model | encode ms/img | QA check ms/img | check / encode | QA cost at K={k} | at K=100 |")
    print("|---|---:|---:|---:|---:|---:|", flush=True)
    for n in a.titok.split(","):
        row(measure(f"TiTok {n} 256px", build_tokenizer(CONFIGS[n]), a.batch, a.reps), k)
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(FLEXTOK_REF / "tiny_flextok.config.json", Path(tmp) / "config.json")
        shutil.copy(FLEXTOK_REF / "tiny_flextok.safetensors", Path(tmp) / "model.safetensors")
        row(measure("FlexTok tiny fixture 64px", load_tokenizer(tmp), a.batch, a.reps), k)
    x = RELEASED_FLEXTOK_DECODE_X_ENCODE
    print(f"| FlexTok d18_d28 256px (FLOPs, not timed) | | | {x:.1f}x | {100 * x / k:.2f}% | {x:.1f}% |")


if __name__ == "__main__":
    main()
