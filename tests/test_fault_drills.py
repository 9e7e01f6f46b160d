"""Fault drills: an encoder actor killed mid-shard, a node removed mid-run, S3 failing ~10% of
requests, an unreachable output. Each run must end with the token columns of a clean run, every
key exactly once, and nothing partial ever listed under ``data/`` or ``stats/``.

The driver killed with SIGKILL and rerun is drilled in
``tests/test_pretokenize.py::test_driver_killed_then_rerun_matches_clean_run``.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import fsspec
import pytest
import ray
from ray._common.utils import reset_ray_address
from ray.cluster_utils import Cluster

from pipeline.distributor import PretokenizeConfig, run_pretokenize
from pipeline.ledger import ShardStats
from pipeline.synthetic import write_synthetic
from tests.faults import FaultyS3Proxy, OutputWatcher, assert_same_tokens, finish, run_in_thread, wait_until
from tests.titok_fixtures import write_titok_checkpoint

REPO = Path(__file__).resolve().parents[1]
SHARDS, PER_SHARD = 10, 40
FAULTS = ("slowdown", "reset", "reset_after")
RUN_TIMEOUT_S = 180  # a hung run fails the test instead of blocking the suite


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> str:
    return str(write_titok_checkpoint("tiny_vq_single_stage", tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    """Webdataset shards long enough (~0.3 s each here) for a fault to land inside one."""
    inp = str(tmp_path_factory.mktemp("drill") / "in")
    write_synthetic(inp, "webdataset", num_shards=SHARDS, images_per_shard=PER_SHARD, seed=11, image_size=(320, 240))
    return inp


def config(inp: str, out: str, tok_dir: str, **kw) -> PretokenizeConfig:
    base = dict(actors=2, gpus_per_actor=1.0, cpus_per_actor=0.5, batch_size=2, progress=False)
    return PretokenizeConfig(input=inp, output=out, tokenizer=tok_dir, **{**base, **kw})


@pytest.fixture(scope="module")
def clean(dataset, tok_dir, tmp_path_factory) -> str:
    """The uninterrupted run every drill is compared with (on its own short-lived local cluster)."""
    out = str(tmp_path_factory.mktemp("clean") / "out")
    ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        assert run_pretokenize(config(dataset, out, tok_dir)).ok
    finally:
        ray.shutdown()
    return out


@pytest.fixture
def local_ray():
    ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.fixture
def three_node_cluster():
    """A head without GPUs and two worker nodes with one (fake) GPU and one CPU each."""
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0, "include_dashboard": False})
    reset_ray_address()  # Cluster publishes its address for any ray.init() on this machine to join: withdraw it
    try:
        workers = [cluster.add_node(num_cpus=1, num_gpus=1) for _ in range(2)]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, logging_level="WARNING")
        yield cluster, workers
    finally:
        ray.shutdown()
        cluster.shutdown()


def all_stats(out: str, storage_options: dict | None = None) -> list[ShardStats]:
    fs, root = fsspec.core.url_to_fs(out, **(storage_options or {}))
    fs.invalidate_cache()
    return [ShardStats.from_json(fs.cat_file(p)) for p in sorted(fs.glob(f"{root}/stats/*.json"))]


def staged(out: str) -> set[str]:
    return {p.name for p in Path(out, "_tmp").glob("*.parquet")}


def socket_port_closed() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def snapshot(folder: str) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in Path(folder).rglob("*")}


def test_encoder_actor_killed_mid_shard(local_ray, dataset, clean, tok_dir, tmp_path):
    out = str(tmp_path / "out")
    with OutputWatcher(out) as watcher:
        thread, box = run_in_thread(run_pretokenize, config(dataset, out, tok_dir))
        assert wait_until(lambda: any(Path(out, "stats").glob("*.json")))
        victim = all_stats(out)[0].worker["pid"]  # it has just committed a shard and takes the next one
        busy = staged(out)
        assert wait_until(lambda: staged(out) - busy, interval_s=0.005)  # a shard has just started
        os.kill(victim, signal.SIGKILL)
        summary = finish(thread, box)
    assert summary.ok and summary.shards_written == SHARDS and summary.rows_written == SHARDS * PER_SHARD
    stats = all_stats(out)
    retried = [s for s in stats if s.worker["attempt"] > 1]
    assert retried, "the killed actor's shard must have been redone"
    assert all(s.worker["pid"] != victim for s in retried)
    assert sorted(s.index for s in stats) == list(range(SHARDS))
    assert not watcher.problems, watcher.problems
    assert_same_tokens(out, clean)


def test_worker_node_removed_mid_run(three_node_cluster, dataset, clean, tok_dir, tmp_path):
    cluster, workers = three_node_cluster
    out = str(tmp_path / "out")
    with OutputWatcher(out) as watcher:
        thread, box = run_in_thread(run_pretokenize, config(dataset, out, tok_dir))
        assert wait_until(lambda: any(Path(out, "stats").glob("*.json")))
        doomed = next(w for w in workers if w.node_id == all_stats(out)[0].worker["node_id"])
        cluster.remove_node(doomed)  # its actor is busy with its next shard
        by_then = {s.index for s in all_stats(out)}
        summary = finish(thread, box)
    assert summary.ok and summary.shards_written == SHARDS and summary.rows_written == SHARDS * PER_SHARD
    stats = all_stats(out)
    assert sorted(s.index for s in stats) == list(range(SHARDS))
    survivor = next(w for w in workers if w is not doomed).node_id
    after = [s for s in stats if s.index not in by_then]
    assert after and all(s.worker["node_id"] == survivor for s in after), "work after the loss ran on the survivor"
    assert any(s.worker["attempt"] > 1 for s in stats), "the shard in flight on the lost node was redone"
    assert not watcher.problems, watcher.problems
    assert_same_tokens(out, clean)


def test_s3_errors_on_ten_percent_of_requests(local_ray, s3, dataset, clean, tok_dir):
    bucket = s3.bucket()
    direct = s3.storage_options
    fs = fsspec.filesystem("s3", **direct)
    fs.put(dataset, f"{bucket}/in", recursive=True)
    inp, out = f"s3://{bucket}/in", f"s3://{bucket}/out"
    with FaultyS3Proxy(s3.endpoint_url, rate=0.1, seed=4, max_requests=5000, lifetime_s=RUN_TIMEOUT_S) as proxy:
        faulty = {**direct, "endpoint_url": proxy.url}
        with OutputWatcher(out, direct, interval_s=0.1) as watcher:
            thread, box = run_in_thread(run_pretokenize, config(inp, out, tok_dir, storage_options=faulty))
            summary = finish(thread, box)
    assert summary.ok and summary.shards_written == SHARDS and summary.rows_written == SHARDS * PER_SHARD
    faults = {f: sum(n for k, n in proxy.counts.items() if k.startswith(f"{f} ")) for f in FAULTS}
    assert all(faults.values()), proxy.counts  # every kind of fault happened, on reads and on writes
    assert any(proxy.counts[f"{f} PUT"] for f in FAULTS) and any(proxy.counts[f"{f} GET"] for f in FAULTS), proxy.counts
    assert proxy.counts["requests"] < 300, proxy.counts  # ~70 without faults: retries stay bounded
    assert sorted(s.index for s in all_stats(out, direct)) == list(range(SHARDS))
    assert not watcher.problems, watcher.problems
    assert_same_tokens(out, clean, direct)
    fs.invalidate_cache()
    assert {p.rsplit("/", 1)[-1]: size for p, size in fs.du(f"{bucket}/in", total=False).items()} == {
        p.name: p.stat().st_size for p in Path(dataset).iterdir()}, "the input changed"


def test_unreachable_output_is_a_clear_error_and_writes_nothing(dataset, tok_dir, tmp_path):
    closed = socket_port_closed()
    out = "s3://pretok-out/tokens"
    options = {"endpoint_url": f"http://127.0.0.1:{closed}", "key": "k", "secret": "s",
               "config_kwargs": {"connect_timeout": 1, "retries": {"max_attempts": 1}}}
    before = snapshot(dataset)
    cwd, tmp = tmp_path / "cwd", tmp_path / "tmp"
    cwd.mkdir()
    tmp.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.pretokenize", dataset, out, "--tokenizer", tok_dir,
         "--storage-options", json.dumps(options), "--no-progress"],
        cwd=cwd, capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
        env={**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": "", "TMPDIR": str(tmp), "RAY_TMPDIR": str(tmp)},
    )
    assert proc.returncode == 2, proc.stderr
    assert f"cannot lock output {out}" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert snapshot(dataset) == before, "the input was modified"
    assert not any(cwd.iterdir()) and not any(tmp.iterdir()), "files were written locally"

