"""Is the device kept fed? The staged data path against a simulated device, in one run on one data set.

  python bench/feed.py [--shards 6] [--per-shard 48] [--batch 16] [--fast-images 24]

Data: synthetic 500x375 JPEGs in webdataset shards; one encoder actor holding all cores (several
shards each, so shard boundaries count). The device is a stand-in for the tokenizer: a fixed time
per image (``time.sleep``, GIL released) returning zero ids, wrapped around the real (tiny)
tokenizer's ``encode_uint8`` entry point of the real driver, actor, writer and commit.

  (a) decode-only: the decode process pool on all cores over the same records (img/s);
  (b) device at 0.5x (a): device busy fraction from the first batch to the last commit (goal >= 95%);
  (c) device at 3x (a): end-to-end img/s over that span / (a) (goal >= 0.90);
  (d) the in-thread path (``--decode-workers 0``: threads in the actor, one shard at a time) on (b), (c).

Also ``--fast-decode`` on LAION-like 1024-2000 px JPEGs: decode speed-up (one process) and the
fraction of token ids identical to exact decoding (tiny reference TiTok).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import ray
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline import distributor  # noqa: E402
from pipeline.actor import EncoderWorker  # noqa: E402
from pipeline.decode import decode_record  # noqa: E402
from pipeline.decodepool import DecodePool, DecodeTask, Slab  # noqa: E402
from pipeline.distributor import PretokenizeConfig, run_pretokenize  # noqa: E402
from pipeline.feed import DeviceStage  # noqa: E402
from pipeline.records import DecodedImage, Record  # noqa: E402
from pipeline.sources import iter_records, list_source  # noqa: E402
from pipeline.synthetic import render, write_synthetic  # noqa: E402
from tests.titok_fixtures import write_titok_checkpoint  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402
from tokenizer.transform import ImageTransform  # noqa: E402

DEVICE_FILE = "device.json"  # beside the output folder: {"per_image_s": ..., "logs": folder}


class SleepDevice:
    """The tokenizer's surface the actor uses, with ``encode_uint8`` taking a fixed time per image."""

    def __init__(self, tok, per_image_s: float, log_path: str):
        self.tok, self.per_image_s, self.log_path = tok, per_image_s, log_path
        self.device, self.fingerprint, self.num_tokens = tok.device, tok.fingerprint, tok.num_tokens
        self.spans: list[tuple[float, float, int]] = []

    def encode_uint8(self, images: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
        t0 = time.time()
        time.sleep(self.per_image_s * images.shape[0])
        self.spans.append((t0, time.time(), int(images.shape[0])))
        with open(self.log_path, "w") as f:
            json.dump(self.spans, f)
        return torch.zeros((images.shape[0], self.num_tokens), dtype=torch.uint16)


class SimulatedEncoder(EncoderWorker):
    """The real encoder actor with the simulated device (settings in ``DEVICE_FILE``)."""

    def start(self) -> dict:
        identity = super().start()
        settings = json.loads(Path(self.job.layout.root).parent.joinpath(DEVICE_FILE).read_text())
        log = os.path.join(settings["logs"], f"device-{os.getpid()}-{time.time_ns()}.json")
        self.tok = SleepDevice(self.tok, settings["per_image_s"], log)
        if self.feed is not None:
            t = self.job.transform
            self.feed = replace(self.feed, device=DeviceStage(self.tok, self.job.precision,
                                                              self.job.batch_size * t.num_views,
                                                              (3, t.resolution, t.resolution)))
        return identity


def decode_only(data: str, transform: ImageTransform, workers: int, batch: int) -> tuple[int, float]:
    """(images, seconds) for the decode pool over every record of ``data``, slabs as in the pipeline."""
    records = [r for s in list_source(data).shards for r in iter_records(s)]
    pool = DecodePool(workers)
    pool.warm(120)
    view = (transform.num_views, 3, transform.resolution, transform.resolution)
    t0 = time.perf_counter()
    inflight, n = [], 0
    for first in range(0, len(records), batch):
        chunk = records[first:first + batch]
        slab = Slab(len(chunk), view)
        per = max(1, -(-len(chunk) // workers))
        inflight.append((slab, [pool.submit(DecodeTask(chunk[i:i + per], slab.name, i, slab.slots, view, transform))
                                for i in range(0, len(chunk), per)]))
        while len(inflight) > 2 * workers:
            s, fs = inflight.pop(0)
            n += sum(len(pool.result(f, 600).rows) for f in fs)
            s.close()
    for s, fs in inflight:
        n += sum(len(pool.result(f, 600).rows) for f in fs)
        s.close()
    seconds = time.perf_counter() - t0
    pool.close()
    return n, seconds


def pipeline_run(data: str, out: str, tok_dir: str, per_image_s: float, decode_workers: int, batch: int,
                 logs: str) -> dict:
    """One pretokenize run with the simulated device; busy fraction and img/s over first batch -> last commit."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).parent.joinpath(DEVICE_FILE).write_text(json.dumps({"per_image_s": per_image_s, "logs": logs}))
    for f in glob.glob(os.path.join(logs, "*.json")):
        os.unlink(f)
    cores = os.cpu_count()
    summary = run_pretokenize(PretokenizeConfig(data, out, tok_dir, batch_size=batch, actors=1, gpus_per_actor=0,
                                                cpus_per_actor=cores, decode_workers=decode_workers, progress=False))
    assert summary.ok, summary.describe()
    spans = [tuple(s) for f in glob.glob(os.path.join(logs, "*.json")) for s in json.load(open(f))]
    last_commit = max(os.path.getmtime(p) for p in glob.glob(os.path.join(out, "stats", "*.json")))
    first = min(s[0] for s in spans)
    wall = last_commit - first
    busy = sum(e - s for s, e, _ in spans)
    return {"busy": busy / wall, "rate": summary.rows_written / wall, "wall": wall, "rows": summary.rows_written}


def fast_decode_bench(tmp: Path, tok_dir: str, images: int) -> dict:
    """Exact vs fast decoding of LAION-like JPEGs (1024-2000 px sides) in this process, and token agreement."""
    rng = np.random.default_rng(3)
    records = []
    for i in range(images):
        w, h = (int(x) for x in rng.integers(1024, 2001, 2))
        path = tmp / f"laion-{i}.jpg"
        render(i % 4, (w, h), rng).save(path, "JPEG", quality=90)
        records.append(Record(f"laion-{i}", path.read_bytes()))
    tok = load_tokenizer(tok_dir)
    transform = ImageTransform(tok.image_size, "center")
    timing, views = {}, {}
    for fast in (False, True):
        t0 = time.perf_counter()
        out = [decode_record(r, transform, fast=fast) for r in records]
        timing[fast] = time.perf_counter() - t0
        assert all(isinstance(d, DecodedImage) for d in out)
        views[fast] = np.concatenate([d.views for d in out])
    ids = {fast: tok.encode_uint8(torch.from_numpy(v)).numpy() for fast, v in views.items()}
    return {"speedup": timing[False] / timing[True], "exact_img_s": images / timing[False],
            "fast_img_s": images / timing[True], "agreement": float((ids[True] == ids[False]).mean()),
            "pixel_mae": float(np.abs(views[True].astype(int) - views[False].astype(int)).mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, default=6)
    ap.add_argument("--per-shard", type=int, default=48)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--fast-images", type=int, default=24)
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("PRETOK_SIMULATED_GPUS", "1")
    load0 = os.getloadavg()[0]
    tmp = Path(tempfile.mkdtemp(prefix="pretok-feed-"))
    data = str(tmp / "data")
    write_synthetic(data, "webdataset", num_shards=args.shards, images_per_shard=args.per_shard,
                    image_size=(500, 375), seed=0)
    tok_dir = str(write_titok_checkpoint("tiny_vq_single_stage", tmp / "tok"))
    transform = ImageTransform(load_tokenizer(tok_dir).image_size, "center")
    cores = os.cpu_count()
    logs = str(tmp / "logs")
    os.makedirs(logs)

    n, seconds = decode_only(data, transform, cores, args.batch)
    a = n / seconds
    ray.init(include_dashboard=False, logging_level="WARNING", num_cpus=cores)
    distributor.EncoderActor = ray.remote(SimulatedEncoder)
    runs = {}
    try:
        for name, speed in (("b", 0.5), ("c", 3.0)):
            for path, workers in (("staged", cores), ("in-thread", 0)):
                runs[name, path] = pipeline_run(data, str(tmp / f"{name}-{path}" / "out"), tok_dir, 1.0 / (speed * a),
                                                workers, args.batch, logs)
    finally:
        ray.shutdown()
    fast = fast_decode_bench(tmp, tok_dir, args.fast_images)
    load1 = os.getloadavg()[0]

    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"## Feed bench (bench/feed.py), {now}\n")
    print(f"Machine: {platform.machine()} VM, {cores} cores, shared with other jobs (load average {load0:.1f} at "
          f"start, {load1:.1f} at the end); torch {torch.__version__}. Data: {n} synthetic 500x375 JPEGs in "
          f"{args.shards} webdataset shards, 1 encoder actor with all {cores} CPUs, batch {args.batch}, "
          f"simulated device (sleep per image, zero ids).\n")
    print(f"(a) decode-only, process pool of {cores} workers: **{a:.1f} img/s**\n")
    print("| case | path | device s/img | device busy (first batch -> last commit) | img/s | img/s / (a) |")
    print("|---|---|---:|---:|---:|---:|")
    for (name, path), r in runs.items():
        speed = 0.5 if name == "b" else 3.0
        print(f"| ({name}) device {speed:g}x (a) | {path} | {1.0 / (speed * a) * 1000:.2f} ms | "
              f"{r['busy']:.1%} | {r['rate']:.1f} | {r['rate'] / a:.2f} |")
    print(f"\nGoals: (b) staged busy >= 95%: {runs['b', 'staged']['busy']:.1%}; "
          f"(c) staged >= 0.90 x (a): {runs['c', 'staged']['rate'] / a:.2f}.\n")
    print(f"`--fast-decode` on {args.fast_images} LAION-like JPEGs (sides 1024-2000 px, synthetic content, quality 90), "
          f"one process: exact {fast['exact_img_s']:.1f} img/s, fast {fast['fast_img_s']:.1f} img/s, "
          f"**speed-up {fast['speedup']:.2f}x**; token ids identical to exact decoding (tiny reference TiTok): "
          f"**{fast['agreement']:.1%}**; mean abs pixel difference of the views {fast['pixel_mae']:.2f}/255.")


if __name__ == "__main__":
    main()
