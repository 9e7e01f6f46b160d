"""Scaling on a simulated multi-node Ray cluster, and the driver-side costs that do not scale with GPUs.

  python bench/scaling.py [--shards 16] [--per-shard 32] [--ledger 200,2000] [--stub-shards 300]

1. Throughput vs actor count (1, 2, 4) with ``ray.cluster_utils.Cluster``: a head without GPUs
   and 2 worker nodes with 2 fake GPUs each; every actor takes one fake GPU and 0.5 CPU and
   encodes on the CPU. Data: synthetic 320x240 JPEGs in webdataset shards; tokenizer: a randomly
   initialised TiTok (256 px, patch 16, 32 tokens, width 128, depth 2).
2. Driver costs per shard, which stay on one process however many GPUs there are: listing N input
   shards, ``Ledger.read`` over N stats files (local, and on a moto S3 server in its own process),
   and the scheduling loop (``_distribute`` with stub actors that return at once, or after a fixed
   sleep, on the same cluster).
Every number is measured in this one run; the Markdown goes to stdout.
"""
from __future__ import annotations

import argparse
import io
import os
import platform
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import fsspec
import ray
import torch
from ray._common.utils import reset_ray_address
from ray.cluster_utils import Cluster

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.pipeline import make_tokenizer  # noqa: E402
from pipeline.actor import SIMULATED_GPUS_ENV  # noqa: E402
from pipeline.distributor import PretokenizeConfig, _distribute, run_pretokenize  # noqa: E402
from pipeline.layout import OutputLayout  # noqa: E402
from pipeline.ledger import Ledger, ShardStats  # noqa: E402
from pipeline.pool import ActorSpec, Pool, State  # noqa: E402
from pipeline.records import InputShard  # noqa: E402
from pipeline.sources import list_source  # noqa: E402
from pipeline.synthetic import write_synthetic  # noqa: E402

STUB_ACTORS = (1, 2, 4, 8, 16)


def start_cluster() -> Cluster:
    """Head (1 CPU, no GPU) + 2 workers (2 CPUs, 2 fake GPUs each), on this machine."""
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0, "include_dashboard": False})
    reset_ray_address()  # keep other ray.init() calls on this machine from joining it
    for _ in range(2):
        cluster.add_node(num_cpus=2, num_gpus=2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="WARNING")
    return cluster


@dataclass
class RunRate:
    actors: int
    images: int
    wall_s: float      # whole run_pretokenize call, actor start-up included
    active_s: float    # first shard start to last commit
    busy_s: float      # sum of the shards' own seconds
    nodes: int

    @property
    def utilization(self) -> float:
        return self.busy_s / (self.actors * self.active_s)


def throughput(data: str, tok_dir: str, out: Path, actors: int) -> RunRate:
    t0 = time.perf_counter()
    summary = run_pretokenize(PretokenizeConfig(data, str(out), tok_dir, actors=actors, gpus_per_actor=1.0,
                                                cpus_per_actor=0.5, batch_size=16, progress=False))
    wall = time.perf_counter() - t0
    assert summary.ok
    stats = {p: ShardStats.from_json(p.read_text()) for p in (out / "stats").glob("*.json")}
    starts = [(out / "data" / f"{s.shard}.parquet").stat().st_mtime - s.seconds for s in stats.values()]
    active = max(p.stat().st_mtime for p in stats) - min(starts)
    return RunRate(actors, summary.rows_written, wall, active, sum(s.seconds for s in stats.values()),
                   len({s.worker["node_id"] for s in stats.values()}))


def tiny_tar() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("000.txt")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    return buf.getvalue()


def fill(url: str, files: dict[str, bytes], so: dict | None) -> None:
    fs, root = fsspec.core.url_to_fs(url, **(so or {}))
    fs.makedirs(root, exist_ok=True)
    for folder in {f"{root}/{name}".rsplit("/", 1)[0] for name in files}:
        fs.makedirs(folder, exist_ok=True)
    fs.pipe({f"{root}/{name}": blob for name, blob in files.items()})


def best_of(fn, so: dict | None, repeat: int = 3) -> float:
    """Fastest of ``repeat`` calls, each with s3fs's listing cache emptied first."""
    times = []
    for _ in range(repeat):
        if so:
            fsspec.filesystem("s3", **so).invalidate_cache()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def listing_cost(url: str, n: int, so: dict | None) -> float:
    fill(url, {f"{i:06d}.tar": tiny_tar() for i in range(n)}, so)
    assert len(list_source(url, "webdataset", so).shards) == n
    return best_of(lambda: list_source(url, "webdataset", so), so)


def ledger_cost(url: str, n: int, so: dict | None) -> float:
    layout = OutputLayout(url, "train", n)
    blob = b"x" * 100
    files = {}
    for i in range(n):
        files[f"data/{layout.shard_name(i)}.parquet"] = blob
        stats = ShardStats(i, layout.shard_name(i), f"in/{i}.tar", 1, 1, 1, data_bytes=len(blob), run_fingerprint="fp")
        files[f"stats/{layout.shard_name(i)}.json"] = stats.to_json().encode()
    fill(url, files, so)
    assert len(Ledger.read(layout, "fp", so).done) == n
    return best_of(lambda: Ledger.read(layout, "fp", so), so)


@ray.remote
class StubWorker:
    """Answers like an encoder actor; ``run`` takes ``work_s`` and returns a one-row shard's stats."""

    def __init__(self, work_s: float):
        self.work_s, self.done = work_s, 0

    def run(self, shard: InputShard, attempt: int = 1) -> ShardStats:
        time.sleep(self.work_s)
        self.done += 1
        return ShardStats(shard.index, f"s{shard.index}", shard.url, None, 1, 1, worker={"attempt": attempt})

    def progress(self) -> int:
        return self.done

    def start(self) -> dict:
        return {"node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}


def scheduling_cost(shards: int, actors: int, work_s: float) -> float:
    """Wall seconds of the driver loop for ``shards`` stub shards (actors started beforehand; the
    driver's commit check is left out: stub shards have no files)."""
    pool = Pool(ActorSpec(actors, 0.0, 0.1),
                lambda options: StubWorker.options(**options, max_concurrency=3).remote(work_s))
    deadline = time.time() + 120
    while any(s.state is not State.IDLE for s in pool.slots) and time.time() < deadline:
        pool.wait(0.1)
    pending = [InputShard(i, f"in/{i}.tar", "webdataset") for i in range(shards)]
    cfg = PretokenizeConfig("in", "out", "tok", progress=False)
    t0 = time.perf_counter()
    outcome = _distribute(pending, pool, cfg, lambda stats: None)
    wall = time.perf_counter() - t0
    assert len(outcome.done) == shards and not outcome.failed and outcome.abort is None
    return wall


def start_moto() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("moto server did not start")


def driver_io(tmp: Path, sizes: list[int]) -> list[str]:
    """Listing and ledger rows, local and on S3 (moto in its own process)."""
    import boto3

    proc, endpoint = start_moto()
    so = {"endpoint_url": endpoint, "key": "bench", "secret": "bench"}
    try:
        boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="bench", aws_secret_access_key="bench",
                     region_name="us-east-1").create_bucket(Bucket="bench")
        rows = []
        for n in sizes:
            for where, base, opts in (("local", str(tmp / "io"), None), ("S3 (moto)", "s3://bench", so)):
                ls = listing_cost(f"{base}/list{n}", n, opts)
                led = ledger_cost(f"{base}/ledger{n}", n, opts)
                rows.append(f"| {n} | {where} | {ls * 1e3:.0f} | {ls / n * 1e3:.3f} | {led * 1e3:.0f} | "
                            f"{led / n * 1e3:.3f} |")
        return rows
    finally:
        proc.terminate()
        proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, default=16)
    ap.add_argument("--per-shard", type=int, default=32)
    ap.add_argument("--ledger", default="200,2000", help="stats-file counts for the listing/ledger rows")
    ap.add_argument("--stub-shards", type=int, default=300)
    ap.add_argument("--stub-work", type=float, default=0.05, help="seconds per stub shard for the busy rows")
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault(SIMULATED_GPUS_ENV, "1")  # the cluster's GPUs are fake: actors encode on CPU
    tmp = Path(tempfile.mkdtemp(prefix="pretok-scaling-"))
    data = str(tmp / "data")
    write_synthetic(data, "webdataset", num_shards=args.shards, images_per_shard=args.per_shard,
                    image_size=(320, 240), seed=0)
    tok_dir = make_tokenizer(tmp / "tok", 128, 2)
    load0 = os.getloadavg()[0]

    cluster = start_cluster()
    try:
        rates = [throughput(data, tok_dir, tmp / f"out{a}", a) for a in (1, 2, 4)]
        sched = {(a, w): scheduling_cost(args.stub_shards, a, w) for a in STUB_ACTORS for w in (0.0, args.stub_work)}
    finally:
        ray.shutdown()
        cluster.shutdown()
    try:
        io_rows = driver_io(tmp, [int(n) for n in args.ledger.split(",")])
    finally:
        shutil.rmtree(tmp)
    load1 = os.getloadavg()[0]

    print(f"# scaling bench {date.today()} on {platform.machine()}, {os.cpu_count()} cores, load average "
          f"{load0:.1f} -> {load1:.1f}, torch {torch.__version__}, ray {ray.__version__}, "
          f"Python {platform.python_version()}")
    print(f"\n{args.shards} shards x {args.per_shard} JPEGs 320x240; TiTok w128 d2 256 px, random weights, batch 16, "
          "fp32 on CPU; actors: 1 fake GPU + 0.5 CPU each, 2 worker nodes with 2 fake GPUs\n")
    print("| actors | nodes used | img/s (whole run) | img/s (first start to last commit) | vs 1 actor | "
          "actor busy |\n|---:|---:|---:|---:|---:|---:|")
    base = rates[0].images / rates[0].active_s
    for r in rates:
        rate = r.images / r.active_s
        print(f"| {r.actors} | {r.nodes} | {r.images / r.wall_s:.1f} | {rate:.1f} | {rate / base:.2f}x | "
              f"{r.utilization:.0%} |")
    print(f"\nDriver loop (`_distribute`), {args.stub_shards} stub shards, stub actors on the cluster:\n")
    print(f"| actors | ms per shard, no work | {args.stub_work * 1e3:.0f} ms work: actor busy |\n|---:|---:|---:|")
    for a in STUB_ACTORS:
        busy = args.stub_shards * args.stub_work / (a * sched[(a, args.stub_work)])
        print(f"| {a} | {sched[(a, 0.0)] / args.stub_shards * 1e3:.1f} | {busy:.0%} |")
    print("\nListing input shards (`list_source`) and reading the ledger (`Ledger.read`), best of 3:\n")
    print("| files | where | listing ms | listing ms/shard | ledger ms | ledger ms/shard |\n"
          "|---:|---|---:|---:|---:|---:|")
    print("\n".join(io_rows))


if __name__ == "__main__":
    main()
