"""Demo-tokenizer training from the routed init vs the default init: held-out PSNR after the same
number of steps, on the same images, seed and schedule (jobs/train_tokenizer.py).

Both runs go in parallel, one process and one torch thread each, so they share the machine
alike; the result is a per-step comparison, not a timing.

    python bench/routed_init.py [--steps 600] [--every 100]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import multiprocessing as mp
import platform
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's packages, not bench/pipeline.py


def _train(routed: bool, steps: int, every: int, samples: int) -> list[dict]:
    from jobs.train_tokenizer import HELDOUT_SEED, TrainSpec, sample_tensors, train_tokenizer

    torch.set_num_threads(1)
    spec = replace(TrainSpec(width=96, depth=2, lr=2e-3), steps=steps, routed_init=routed)
    images, _ = sample_tensors(samples, spec.seed, spec.image_size)
    held, _ = sample_tensors(256, HELDOUT_SEED, spec.image_size)
    with tempfile.TemporaryDirectory() as out, contextlib.redirect_stdout(io.StringIO()):  # its per-save JSON lines
        return train_tokenizer(images, held, out, spec, progress=False, save_every=every)["history"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--every", type=int, default=100, help="evaluate every N steps")
    p.add_argument("--samples", type=int, default=4096, help="built-in sample images to train on")
    a = p.parse_args()
    t0 = time.time()
    with mp.get_context("spawn").Pool(2) as pool:
        default, routed = pool.starmap(_train, [(False, a.steps, a.every, a.samples), (True, a.steps, a.every, a.samples)])
    print(f"{time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{a.steps} steps, {time.time() - t0:.0f} s\n")
    print("| step | default init dB | routed init dB | gain dB |\n|---|---|---|---|")
    for d, r in zip(default, routed):
        print(f"| {d['step']} | {d['heldout_psnr_db']:.2f} | {r['heldout_psnr_db']:.2f} | "
              f"{r['heldout_psnr_db'] - d['heldout_psnr_db']:+.2f} |")


if __name__ == "__main__":
    main()
