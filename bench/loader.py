"""Generator data loading: pretokenized shards vs JPEG decode + transform, on one CPU core.

In one run, on the same synthetic images:
  jpeg          PIL decode + ``tokenizer.transform.ImageTransform`` (the official TiTok
                preprocessing) + one random view per sample, stacked into uint8 batches
  tokens        ``pipeline.tokens.TokenLoader``: full shuffled epochs over Parquet token shards
                (read, one random view per row, global permutation, int64 batches)
and, to justify the loader's design, two other ways to get shuffled token batches:
  arrow-take    permutation + ``pyarrow.Table.take`` per batch, then the view pick
  per-row       ``datasets.Dataset`` from ``load_tokens``, ``ds[i]`` per sample (numpy format)

The token shards hold ``--rows`` rows of the shape the tokenizer gives these images ([V,N] per
image; an epoch over a few hundred rows is too short to time), written with the output writer's
encoding (zstd, dictionary, 8192-row groups). The ids are uniform random (no trained tokenizer
here), which compresses no better than real tokens, so the read cost is not understated.

  python bench/loader.py [--images 200] [--rows 400000] [--num-tokens 32] [--views 2] [--batch 256]
"""
from __future__ import annotations

import argparse
import io
import os
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.tokens import TokenFiles, TokenLoader, load_tokens, tokens_array  # noqa: E402
from tests.test_tokens import write_token_dataset  # noqa: E402
from tokenizer.transform import ImageTransform  # noqa: E402

SIZES = ((500, 375), (375, 500), (500, 333), (640, 480), (500, 500))  # ImageNet-like


def synthetic_jpegs(n: int, seed: int = 0) -> list[bytes]:
    """Smooth colour fields with noise and a few shapes, JPEG quality 90."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        w, h = SIZES[i % len(SIZES)]
        yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
        base = np.stack([np.sin(xx * rng.uniform(2, 12) + c) * np.cos(yy * rng.uniform(2, 12)) for c in range(3)], -1)
        img = (127 + 100 * base + rng.normal(0, 12, (h, w, 3))).clip(0, 255).astype(np.uint8)
        for _ in range(4):
            x0, y0 = rng.integers(0, w - 60), rng.integers(0, h - 60)
            img[y0 : y0 + rng.integers(20, 60), x0 : x0 + rng.integers(20, 60)] = rng.integers(0, 255, 3)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def bench_jpeg(jpegs: list[bytes], transform: ImageTransform, batch: int, seed: int = 0) -> float:
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(jpegs))
    start = time.perf_counter()
    for i in range(0, len(order), batch):
        views = [transform(Image.open(io.BytesIO(jpegs[j]))) for j in order[i : i + batch]]
        batch_u8 = torch.from_numpy(np.stack([v[rng.integers(len(v))] for v in views]))
        assert batch_u8.dtype == torch.uint8
    return len(order) / (time.perf_counter() - start)


def bench_token_loader(files: TokenFiles, batch: int, epochs: int = 2) -> float:
    loader = TokenLoader(files, batch, seed=0)
    rates = []
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        start, rows = time.perf_counter(), 0
        for tokens, labels in loader:
            rows += len(labels)
        rates.append(rows / (time.perf_counter() - start))
    return max(rates)


def bench_arrow_take(files: TokenFiles, batch: int, rows: int) -> float:
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    table = pa.concat_tables(pq.read_table(f, columns=["tokens", "label"]) for f in files.files)
    order = rng.permutation(table.num_rows)[:rows]
    for i in range(0, len(order), batch):
        part = table.take(order[i : i + batch])
        views = tokens_array(part.column("tokens"))
        pick = rng.integers(views.shape[1], size=len(views))
        torch.from_numpy(views[np.arange(len(views)), pick].astype(np.int64))
        torch.from_numpy(part.column("label").to_numpy().astype(np.int64))
    return len(order) / (time.perf_counter() - start)


def bench_per_row(out: str, rows: int, cache_dir: str) -> float:
    ds = load_tokens(out, cache_dir=cache_dir).with_format("numpy")
    rng = np.random.default_rng(0)
    order = rng.permutation(len(ds))[:rows]
    start = time.perf_counter()
    for i in order:
        row = ds[int(i)]
        row["tokens"][rng.integers(len(row["tokens"]))].astype(np.int64)
    return len(order) / (time.perf_counter() - start)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--rows", type=int, default=400_000)
    p.add_argument("--shards", type=int, default=16)
    p.add_argument("--num-tokens", type=int, default=32)
    p.add_argument("--views", choices=["center", "flip", "tencrop"], default="flip")
    p.add_argument("--codebook-size", type=int, default=4096)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--resolution", type=int, default=256)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)

    transform = ImageTransform(args.resolution, args.views)
    jpegs = synthetic_jpegs(args.images)
    rate_jpeg = bench_jpeg(jpegs, transform, args.batch)

    with tempfile.TemporaryDirectory() as tmp:
        v, n = transform.num_views, args.num_tokens
        tokens = np.random.default_rng(1).integers(0, args.codebook_size, (args.rows, v, n), np.uint16)
        shard_rows = [len(s) for s in np.array_split(np.arange(args.rows), args.shards)]
        data = write_token_dataset(f"{tmp}/out", shard_rows, num_tokens=n, num_views=v,
                                   codebook_size=args.codebook_size, tokens=tokens, row_group_size=8192)
        files = TokenFiles.open(data.out)
        size = sum(os.path.getsize(f) for f in files.files)
        rate_tokens = bench_token_loader(files, args.batch)
        rate_take = bench_arrow_take(files, args.batch, min(args.rows, 100_000))
        rate_row = bench_per_row(data.out, min(args.rows, 5_000), f"{tmp}/cache")

    cmd = "python bench/loader.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"## Token loader vs JPEG loader ({date.today().isoformat()})\n")
    load = os.getloadavg()[0]
    print(f"- machine: {cpu_name()}, {os.cpu_count()} cores, load average {load:.1f} during the run; "
          f"torch and pyarrow limited to 1 thread; Python {platform.python_version()}, torch {torch.__version__}")
    print(f"- command: `{cmd.strip()}`")
    print(f"- data: {args.images} synthetic JPEGs (ImageNet-like sizes, q90) -> {args.resolution}px "
          f"`{args.views}` views; random tokens N={n}, V={v}, C={args.codebook_size}, {args.rows} rows in "
          f"{args.shards} shards, {size / args.rows:.1f} bytes/row on disk; batch {args.batch}\n")
    print("| loader | samples/s (1 core) | vs JPEG |")
    print("| --- | ---: | ---: |")
    for name, rate in (("jpeg decode + transform", rate_jpeg), ("TokenLoader (shuffled epoch)", rate_tokens),
                       ("arrow take per batch", rate_take), ("datasets per-row `ds[i]`", rate_row)):
        print(f"| {name} | {rate:,.0f} | {rate / rate_jpeg:,.1f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
