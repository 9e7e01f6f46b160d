"""Generator training throughput: 1 vs 2 Ray Train workers, data loading vs step cost, loaders side by side.

In one run, on one synthetic token dataset (uniform random ids, the writer's Parquet layout):
  loaders     samples/s of iterating one epoch: StreamLoader (the trainer's), TokenLoader, Ray Data
              (``ray.data.read_parquet`` + iter_batches, pyarrow batches, the view pick included)
  training    the same model and per-worker batch on the local path (1 process), on Ray Train with
              1 worker and with 2 workers (gloo): samples/s (global and per worker) over the steps after
              the first few, scaling efficiency = samples/s(2) / (2 x samples/s(1)) on Ray Train, and the
              mean time a step waits for its batch vs the time it computes.

  python bench/train.py [--rows 65536] [--shards 16] [--num-tokens 32] [--batch 32] [--steps 30] [--width 128]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.loader import cpu_name  # noqa: E402
from jobs import train_generator  # noqa: E402
from pipeline.tokens import StreamLoader, TokenFiles, TokenLoader, tokens_array  # noqa: E402
from tests.test_tokens import write_token_dataset  # noqa: E402

WARMUP = 5  # steps left out of the rates (process start, first reads, allocator)


def loader_rates(out: str, batch: int) -> dict[str, float]:
    from generator.ray_data import read_tokens

    files = TokenFiles.open(out)
    rates = {}
    for name, loader in (("StreamLoader", StreamLoader(files, batch, 16)), ("TokenLoader", TokenLoader(files, batch))):
        start, rows = time.perf_counter(), 0
        for _, labels in loader:
            rows += len(labels)
        rates[name] = rows / (time.perf_counter() - start)
    ds = read_tokens(files).materialize()  # read once; time the iteration as the trainer does it
    rng = np.random.default_rng(0)
    start, rows = time.perf_counter(), 0
    for table in ds.iter_batches(batch_size=batch, batch_format="pyarrow", local_shuffle_buffer_size=4 * batch):
        views = tokens_array(table.column("tokens"))
        torch.from_numpy(views[np.arange(len(views)), rng.integers(views.shape[1], size=len(views))].astype(np.int64))
        rows += table.num_rows
    rates["Ray Data (materialized)"] = rows / (time.perf_counter() - start)
    return rates


def train_rates(out: str, ckpt: str, args, workers: int) -> dict[str, float]:
    argv = [out, ckpt, "--steps", str(args.steps), "--batch-size", str(args.batch), "--width", str(args.width),
            "--depth", "2", "--heads", "4", "--loader-workers", "0", "--no-progress", "--save-every", "1000"]
    if workers == 1:  # --train-workers 1 is the local path; Ray Train with 1 worker goes through the API
        from generator.distributed import fit_distributed

        fit_distributed(train_generator.build_job(train_generator.build_parser().parse_args(argv))[0], 1,
                        cpus_per_worker=0.5)
        return _rates(ckpt)
    if workers:
        argv += ["--train-workers", str(workers), "--cpus-per-worker", "0.5"]
    if train_generator.main(argv) != 0:
        raise RuntimeError(f"training with {workers} workers failed")
    return _rates(ckpt)


def _rates(ckpt: str) -> dict[str, float]:
    records = [json.loads(line) for line in Path(ckpt, "metrics.jsonl").read_text().splitlines()]
    global_batch = records[0]["samples"]
    records = records[WARMUP:]
    wall = sum(r["data_s"] + r["step_s"] for r in records)
    return {"samples_s": global_batch * len(records) / wall, "data_ms": 1e3 * np.mean([r["data_s"] for r in records]),
            "step_ms": 1e3 * np.mean([r["step_s"] for r in records])}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=65536)
    p.add_argument("--shards", type=int, default=16)
    p.add_argument("--num-tokens", type=int, default=32)
    p.add_argument("--codebook-size", type=int, default=4096)
    p.add_argument("--batch", type=int, default=32, help="per worker")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--width", type=int, default=128)
    args = p.parse_args(argv)
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    torch.set_num_threads(1)
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    load = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory() as tmp:
        tokens = np.random.default_rng(1).integers(0, args.codebook_size, (args.rows, 2, args.num_tokens), np.uint16)
        shard_rows = [len(s) for s in np.array_split(np.arange(args.rows), args.shards)]
        out = write_token_dataset(f"{tmp}/out", shard_rows, num_tokens=args.num_tokens, codebook_size=args.codebook_size,
                                  tokens=tokens, row_group_size=8192, label_names=tuple("abcdefghij")).out
        loaders = loader_rates(out, 256)
        load.append(os.getloadavg()[0])
        runs = {name: train_rates(out, f"{tmp}/{name}", args, w)
                for name, w in (("local", 0), ("ray1", 1), ("ray2", 2))}
        load.append(os.getloadavg()[0])
    ray.shutdown()
    eff = runs["ray2"]["samples_s"] / (2 * runs["ray1"]["samples_s"])
    cmd = "python bench/train.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"## Generator training: Ray Train scaling and loaders ({date.today().isoformat()})\n")
    print(f"- machine: {cpu_name()}, {os.cpu_count()} cores, load average {min(load):.1f}-{max(load):.1f} during the "
          f"run (shared with other jobs); Python {platform.python_version()}, torch {torch.__version__}, "
          f"Ray {ray.__version__}; CPU only, gloo, 0.5 CPU per Ray Train worker, torch 1 thread a process")
    print(f"- command: `{cmd.strip()}`")
    print(f"- data: {args.rows} rows of random tokens N={args.num_tokens}, 2 views, C={args.codebook_size}, in "
          f"{args.shards} shards; model width {args.width}, depth 2; batch {args.batch} per worker, {args.steps} steps, "
          f"rates over steps {WARMUP + 1}-{args.steps}\n")
    print("| loader (one epoch, batch 256, 1 process) | samples/s | vs StreamLoader |")
    print("| --- | ---: | ---: |")
    for name, rate in loaders.items():
        print(f"| {name} | {rate:,.0f} | {rate / loaders['StreamLoader']:.2f}x |")
    print("\n| training | workers | samples/s | per worker | batch wait ms/step | compute ms/step |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, label, w in (("local", "local path", 1), ("ray1", "Ray Train", 1), ("ray2", "Ray Train", 2)):
        r = runs[name]
        print(f"| {label} | {w} | {r['samples_s']:,.0f} | {r['samples_s'] / w:,.0f} | {r['data_ms']:.1f} | "
              f"{r['step_ms']:.1f} |")
    print(f"\nScaling efficiency 1 -> 2 Ray Train workers: {eff:.2f} (samples/s of 2 / twice that of 1).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
