"""Drills that need a cluster of their own: a worker node that does not share the local output
folder (its processes run in a mount namespace where an empty folder covers it), and an actor that
Ray's memory monitor kills mid-shard (``ray.exceptions.OutOfMemoryError`` at the driver)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import ray
from ray._common.utils import reset_ray_address
from ray.cluster_utils import Cluster

from pipeline import distributor
from pipeline.distributor import PretokenizeConfig, run_pretokenize
from pipeline.ledger import ShardStats
from pipeline.synthetic import write_synthetic
from tests.faults import (FaultyEncoder, expected_tokens, keyed_tokens, pretokenize_cli, read_output, unshare_prefix,
                          wait_until)

REPO = Path(__file__).resolve().parents[1]
ARGS = ["--actors", "1", "--gpus-per-actor", "1", "--cpus-per-actor", "0.5", "--batch-size", "2", "--no-progress"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    inp = str(tmp_path_factory.mktemp("data") / "in")
    write_synthetic(inp, "webdataset", num_shards=3, images_per_shard=3, seed=41, image_size=(64, 48))
    return inp


def _memory_used_fraction() -> tuple[float, int]:
    info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in open("/proc/meminfo")}
    return 1 - info["MemAvailable"] / info["MemTotal"], info["MemTotal"]


# The memory drill's actor allocates HOG bytes; Ray's monitor kills at MARGIN above the use at start
# (other processes on the machine, e.g. a second test worker, may grow meanwhile: the margin leaves them room).
HOG, MARGIN = 6 << 30, 3 << 30


@pytest.fixture
def split_view_cluster(tmp_path):
    """A head without GPUs (the driver's node) and a worker node with one GPU whose processes see
    an empty folder over ``outputs``. Yields ``outputs``."""
    prefix = unshare_prefix()
    if prefix is None:
        pytest.skip("needs mount namespaces (unshare -m) to give a node its own view of a folder")
    outputs, view = tmp_path / "outputs", tmp_path / "node-view"
    outputs.mkdir()
    view.mkdir()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0, "include_dashboard": False})
    reset_ray_address()
    ray_cli = Path(sys.executable).with_name("ray")
    script = (f"mount --bind {view} {outputs} && exec {ray_cli} start --address={cluster.address} "
              "--num-cpus=1 --num-gpus=1 --disable-usage-stats --block")
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": ""}
    node = subprocess.Popen([*prefix, "sh", "-c", script], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        ray.init(address=cluster.address, logging_level="WARNING")
        assert wait_until(lambda: sum(n["Alive"] for n in ray.nodes()) == 2, timeout_s=120), "node did not join"
        yield outputs
    finally:
        ray.shutdown()
        node.terminate()
        try:
            node.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(node.pid, signal.SIGKILL)
            node.wait(30)
        cluster.shutdown()


def test_local_output_other_nodes_do_not_see_is_refused(split_view_cluster, dataset, tok_dir):
    out = split_view_cluster / "out"
    code, stdout, err = pretokenize_cli(dataset, out, "--tokenizer", tok_dir, *ARGS)
    assert code == 2, (stdout, err)
    assert f"local output {out} is not shared by the cluster" in err and "s3://" in err and "Traceback" not in err
    assert not list(Path(out, "data").glob("*")) and not list(Path(out, "stats").glob("*"))


def test_actor_killed_by_rays_memory_monitor_is_replaced_and_its_shard_redone(dataset, tok_dir, tmp_path,
                                                                             monkeypatch):
    used, total = _memory_used_fraction()
    if total * (1 - used) < 2 * HOG:
        pytest.skip("not enough free memory to provoke Ray's memory monitor safely")
    out = tmp_path / "out"
    (tmp_path / "faults.json").write_text(json.dumps({"hog_once": HOG}))
    monkeypatch.setattr(distributor, "EncoderActor", ray.remote(FaultyEncoder))
    monitor = {"memory_usage_threshold": used + MARGIN / total, "memory_monitor_refresh_ms": 100}
    ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, logging_level="WARNING",
             _system_config=monitor)
    try:
        summary = run_pretokenize(PretokenizeConfig(
            dataset, str(out), tok_dir, actors=1, gpus_per_actor=1.0, cpus_per_actor=0.5, batch_size=2,
            progress=False))
    finally:
        ray.shutdown()
    assert summary.ok and summary.shards_written == 3, summary.describe()
    stats = [ShardStats.from_json(p.read_text()) for p in sorted(out.glob("stats/*.json"))]
    assert sorted(s.worker["attempt"] for s in stats) == [1, 1, 2]
    got, want = keyed_tokens(read_output(str(out))), expected_tokens(dataset, tok_dir)
    assert got.keys() == want.keys() and all(np.array_equal(np.asarray(got[k]), want[k]) for k in want)
