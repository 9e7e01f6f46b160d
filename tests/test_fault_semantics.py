"""Drills for cluster-grade fault semantics on a real local Ray cluster (2 fake GPUs) and the moto
S3 server: overwrite of one split, input/output spellings, concurrent runs, actors that cannot be
placed, started or trusted, Ray errors, commits the driver cannot see, decode errors, bad input,
hashes and staging leftovers. Every drill compares with a clean run (token columns, keys) and checks
what a user sees (exit status, message).

Faults inside actors come from ``tests.faults.FaultyEncoder`` (the real actor plus a plan).
Drills that need their own cluster (nodes without a shared filesystem, Ray's memory monitor) are
in ``tests/test_cluster_faults.py``.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import socket
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path

import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
from datasets import load_dataset
from PIL import Image

from pipeline import distributor
from pipeline.distributor import PretokenizeConfig, run_pretokenize
from pipeline.lease import LeaseInfo, _boot_id
from pipeline.ledger import ShardStats
from pipeline.manifest import run_fingerprint
from pipeline.staging import worker_temp_prefix
from pipeline.synthetic import render, write_synthetic
from tests.faults import (
    FaultyEncoder, FaultyS3Proxy, OutputWatcher, assert_same_tokens, expected_tokens, finish, read_output,
    run_in_thread, wait_until,
)
from tests.faults import pretokenize_cli as cli
from tests.titok_fixtures import write_titok_checkpoint

SHARDS, PER_SHARD, SIZE = 6, 4, (64, 48)
RUN_TIMEOUT_S = 240  # a hung run fails its drill instead of blocking the suite
ARGS = ["--actors", "1", "--gpus-per-actor", "1", "--cpus-per-actor", "0.5", "--batch-size", "2", "--no-progress"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    inp = str(tmp_path_factory.mktemp("data") / "in")
    write_synthetic(inp, "webdataset", num_shards=SHARDS, images_per_shard=PER_SHARD, seed=31, image_size=SIZE)
    return inp


def config(inp, out, tok_dir, **kw) -> PretokenizeConfig:
    base = dict(actors=1, gpus_per_actor=1.0, cpus_per_actor=0.5, batch_size=2, progress=False)
    return PretokenizeConfig(input=str(inp), output=str(out), tokenizer=tok_dir, **{**base, **kw})


@pytest.fixture(scope="module")
def clean(cluster, dataset, tok_dir, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("clean") / "out")
    assert run_pretokenize(config(dataset, out, tok_dir, actors=2)).ok
    return out


@pytest.fixture
def faulty(monkeypatch):
    """Run the FaultyEncoder; ``faulty(out, **plan)`` writes the plan for output ``out``."""
    monkeypatch.setattr(distributor, "EncoderActor", ray.remote(FaultyEncoder))

    def plan(out, **faults) -> None:
        Path(out).resolve().parent.joinpath("faults.json").write_text(json.dumps(faults))
    return plan


def stats_of(out, split="train") -> list[ShardStats]:
    return [ShardStats.from_json(p.read_text()) for p in sorted(Path(out, "stats").glob(f"{split}-*.json"))]


def files_of(out, split: str) -> dict[str, tuple[int, int]]:
    """name -> (size, mtime) of a split's data and stats files."""
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns)
            for d in ("data", "stats") for p in Path(out, d).glob(f"{split}-*")}


def everything(out) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in Path(out).rglob("*")
            if p.is_file() and "_locks" not in p.parts}


def assert_split_tokens(out, clean, split: str) -> None:
    """``split`` in ``out`` holds the clean run's train tokens, shard by shard."""
    got = {k.replace(f"{split}-", "", 1): t for k, t in read_output(out).items() if k.startswith(f"{split}-")}
    want = {k.replace("train-", "", 1): t for k, t in read_output(clean).items()}
    assert got.keys() == want.keys(), (sorted(got), sorted(want))
    for name, table in want.items():
        assert got[name]["tokens"].equals(table["tokens"]) and got[name]["key"].equals(table["key"]), name


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


# -- 1. overwrite and manifest ----------------------------------------------------------------------
def test_overwrite_replaces_only_its_split(cluster, clean, tok_dir, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(clean, out)
    val_a, val_b = tmp_path / "val_a", tmp_path / "val_b"
    write_synthetic(str(val_a), "webdataset", num_shards=2, images_per_shard=3, seed=32, image_size=SIZE)
    write_synthetic(str(val_b), "webdataset", num_shards=1, images_per_shard=3, seed=33, image_size=SIZE)
    assert run_pretokenize(config(val_a, out, tok_dir, split="validation")).ok
    train = files_of(out, "train")

    code, stdout, err = cli(val_b, out, "--tokenizer", tok_dir, "--split", "validation", "--overwrite", *ARGS)
    assert code == 0, err
    assert files_of(out, "train") == train, "overwriting validation touched train"
    assert sorted(files_of(out, "validation")) == ["validation-00000-of-00001.json", "validation-00000-of-00001.parquet",
                                                        "validation-00000-of-00001.qa.png"]
    manifest = json.loads(Path(out, "pretok.json").read_text())
    assert sorted(manifest["splits"]) == ["train", "validation"] and manifest["splits"]["validation"]["num_shards"] == 1
    ds = load_dataset(str(out), cache_dir=str(tmp_path / "hf"))
    assert (ds["train"].num_rows, ds["validation"].num_rows) == (SHARDS * PER_SHARD, 3)
    assert_split_tokens(out, clean, "train")

    before = everything(out)
    other = write_titok_checkpoint("tiny_vq_two_stage", tmp_path / "tok2")
    code, _, err = cli(val_b, out, "--tokenizer", other, "--split", "validation", "--overwrite", *ARGS)
    assert code == 2 and "--overwrite replaces split 'validation' only" in err and "train" in err, err
    assert "fingerprint differs" in err and "--overwrite-all" in err and "Traceback" not in err
    assert everything(out) == before, "a refused overwrite changed the output"

    code, _, err = cli(val_b, out, "--tokenizer", other, "--split", "validation", "--overwrite-all", *ARGS)
    assert code == 0, err
    assert json.loads(Path(out, "pretok.json").read_text())["splits"].keys() == {"validation"}
    assert not files_of(out, "train") and "train" not in Path(out, "README.md").read_text()


# -- 2. canonical URLs, and 6. output paths made absolute ------------------------------------------
def test_any_spelling_of_input_and_output_resumes(cluster, dataset, clean, tok_dir, tmp_path, monkeypatch,
                                                  faulty, caplog):
    monkeypatch.chdir(tmp_path)
    old = tmp_path / "old"  # as an earlier version wrote it: the input as typed, relative with a slash
    shutil.copytree(clean, old)
    manifest = json.loads(Path(old, "pretok.json").read_text())
    manifest["splits"]["train"]["input"] = os.path.relpath(dataset, tmp_path) + "/"
    Path(old, "pretok.json").write_text(json.dumps(manifest))
    for path in Path(old, "stats").glob("*.json"):
        stats = json.loads(path.read_text())
        path.write_text(json.dumps({**stats, "run_fingerprint": run_fingerprint(manifest, "train")}))
    resumed = run_pretokenize(config(dataset, old, tok_dir))
    assert (resumed.shards_written, resumed.shards_skipped_done) == (0, SHARDS)
    assert json.loads(Path(old, "pretok.json").read_text())["splits"]["train"]["input"].endswith("in/")

    shutil.copytree(dataset, tmp_path / "in")
    elsewhere = tmp_path / "elsewhere"  # the actors' working dir (as under ray job submit --working-dir)
    elsewhere.mkdir()
    faulty("out", cwd=str(elsewhere))
    locks = tmp_path / "out" / "_locks"
    locks.mkdir(parents=True)
    now = time.time()  # the lease of a driver killed with SIGKILL a moment ago
    stale = LeaseInfo("run-killed", "split-train", socket.gethostname(), _boot_id(), dead_pid(), now, now, 600)
    (locks / "split-train.json").write_bytes(stale.encode())
    with caplog.at_level(logging.WARNING, logger="pretok"):
        code, stdout, err = cli("in/", "out/", "--tokenizer", tok_dir, *ARGS)
    assert code == 0, err
    assert "took over the stale lease split-train" in caplog.text and "run-killed" in caplog.text
    assert not any(elsewhere.iterdir()), "actors wrote into their own working directory"
    assert_same_tokens(str(tmp_path / "out"), clean)
    run_id = stdout.split("run ", 1)[1].split(")", 1)[0]
    assert {s.run_id for s in stats_of(tmp_path / "out")} == {run_id}
    for inp, out in ((tmp_path / "in", f"{tmp_path}/out/"), ("./in//", "out"), (f"file://{tmp_path}/in/", "./out")):
        again = run_pretokenize(config(inp, out, tok_dir))
        assert (again.shards_written, again.shards_skipped_done) == (0, SHARDS), (inp, out)


# -- 3. run leases ------------------------------------------------------------------------------------
def test_two_splits_run_together_and_a_second_run_of_one_is_refused(cluster, dataset, clean, tok_dir, tmp_path):
    out = str(tmp_path / "out")
    val = tmp_path / "val"
    write_synthetic(str(val), "webdataset", num_shards=2, images_per_shard=3, seed=35, image_size=SIZE)
    train_run = run_in_thread(run_pretokenize, config(dataset, out, tok_dir))
    assert wait_until(lambda: Path(out, "_locks", "split-train.json").exists())
    val_run = run_in_thread(run_pretokenize, config(val, out, tok_dir, split="validation"))
    code, _, err = cli(dataset, out, "--tokenizer", tok_dir, *ARGS)
    assert code == 2 and "split 'train' of" in err and "is being written by run" in err and "--lease-wait" in err, err
    waiting = run_in_thread(run_pretokenize, config(dataset, out, tok_dir, lease_wait_s=RUN_TIMEOUT_S))
    train, validation, later = (finish(*r) for r in (train_run, val_run, waiting))
    assert train.ok and validation.ok and later.ok
    assert (later.shards_written, later.shards_skipped_done) == (0, SHARDS), "the waiting run redid work"
    assert sorted(json.loads(Path(out, "pretok.json").read_text())["splits"]) == ["train", "validation"]
    card = Path(out, "README.md").read_text()
    assert "split: train" in card and "split: validation" in card
    ds = load_dataset(out, cache_dir=str(tmp_path / "hf"))
    assert (ds["train"].num_rows, ds["validation"].num_rows) == (SHARDS * PER_SHARD, 6)
    assert_split_tokens(out, clean, "train")
    assert {s.run_id for s in stats_of(out)} == {train.run_id}
    assert not Path(out, "_locks", "split-train.json").exists() and not Path(out, "_locks", "manifest.json").exists()


# -- 4. actors ---------------------------------------------------------------------------------------
def test_actor_that_cannot_be_placed_does_not_hang_the_run(cluster, dataset, clean, tok_dir, tmp_path):
    out = str(tmp_path / "out")
    with OutputWatcher(out) as watcher:  # 3 actors x 1 GPU on 2 GPUs
        summary = finish(*run_in_thread(run_pretokenize, config(dataset, out, tok_dir, actors=3,
                                                                placement_timeout_s=4)))
    assert summary.ok and summary.shards_written == SHARDS and len(summary.unplaced) == 1, summary.describe()
    assert "UNPLACED actor" in summary.describe()
    assert not watcher.problems, watcher.problems
    assert_same_tokens(out, clean)


def test_no_placeable_actor_is_a_clear_error(cluster, dataset, tok_dir, tmp_path):
    out = tmp_path / "out"
    code, stdout, err = cli(dataset, out, "--tokenizer", tok_dir, *ARGS, "--gpus-per-actor", "3",
                            "--placement-timeout", "2")
    assert code == 2 and "no encoder actor could be placed within 2 s" in err, err
    assert "asked for {'GPU': 3.0, 'CPU': 0.5} each" in err and "'GPU': 2.0" in err and "Traceback" not in err
    assert not Path(out, "data").exists() and "0 written now" in stdout


def test_bad_gpu_and_cuda_errors_use_up_no_shard_retries(cluster, dataset, clean, tok_dir, tmp_path, faulty,
                                                         caplog):
    out = str(tmp_path / "out")
    faulty(out, cuda_error_gpu="1", broken_gpu="0")
    with caplog.at_level(logging.WARNING, logger="pretok"), OutputWatcher(out) as watcher:
        summary = finish(*run_in_thread(run_pretokenize, config(dataset, out, tok_dir, actors=2, max_retries=1)))
    assert summary.ok and summary.shards_written == SHARDS, summary.describe()
    assert all(s.worker["gpu_ids"] == ["1"] for s in stats_of(out)), "a shard was committed by the broken GPU"
    assert "shards failed on it in a row (last: RuntimeError: broken GPU" in caplog.text
    assert "device error: OutOfMemoryError: CUDA out of memory" in caplog.text
    assert not watcher.problems, watcher.problems
    assert_same_tokens(out, clean)


def test_checkpoint_that_does_not_fit_its_config_stops_before_any_actor(cluster, dataset, tok_dir, tmp_path):
    bad = tmp_path / "bad_tok"
    shutil.copytree(tok_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["dataset"]["preprocessing"]["crop_size"] = 64  # the positional embedding is for 32
    (bad / "config.json").write_text(json.dumps(cfg))
    code, _, err = cli(dataset, tmp_path / "out", "--tokenizer", bad, *ARGS)
    assert code == 2 and "checkpoint does not match the model config" in err and "positional_embedding" in err, err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_gpu_actor_without_cuda_stops_the_run_with_the_real_cause(cluster, dataset, tok_dir, tmp_path, faulty):
    out = tmp_path / "out"
    faulty(out, real_gpus=True)
    code, stdout, err = cli(dataset, out, "--tokenizer", tok_dir, *ARGS, "--actors", "2", "--max-start-failures", "2")
    assert code == 2, err
    assert "encoder actors failed to start 2 times in a row; last error: DeviceError: this actor holds GPU" in err
    assert "sees no CUDA device" in err and "ActorDiedError" not in err and "Traceback" not in err
    assert not list(Path(out, "data").glob("*")) and "STOPPED" in stdout


def test_hung_and_unseen_actors_are_replaced_and_their_shards_redone(cluster, dataset, clean, tok_dir,
                                                                         tmp_path, faulty, caplog):
    out = str(tmp_path / "out")
    faulty(out, hang_once=True, vanish_once=True)
    with caplog.at_level(logging.WARNING, logger="pretok"), OutputWatcher(out) as watcher:
        summary = finish(*run_in_thread(run_pretokenize, config(dataset, out, tok_dir, actors=2, stall_timeout_s=3)))
    assert summary.ok and summary.shards_written == SHARDS, summary.describe()
    assert "actor lost: ActorStalled: no image done for 3 s" in caplog.text  # a shard that never returns
    assert "but the driver sees: data file missing" in caplog.text           # a commit the driver cannot see
    assert sum(s.worker["attempt"] - 1 for s in stats_of(out)) == 2  # one attempt lost to each fault
    assert not watcher.problems, watcher.problems
    assert_same_tokens(out, clean)


# -- 5. decode errors and 9. bad input --------------------------------------------------------------
def tar_of(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_only_image_content_errors_become_skips(cluster, tok_dir, tmp_path, faulty):
    inp, out = tmp_path / "in", tmp_path / "out"
    info = write_synthetic(str(inp), "webdataset", num_shards=2, images_per_shard=3, seed=34, image_size=SIZE)
    big, ppm = io.BytesIO(), io.BytesIO()
    render(1, (320, 240), np.random.default_rng(0)).save(big, "PNG")
    Image.new("RGB", (40, 30), (9, 99, 199)).save(ppm, "PPM")
    good = io.BytesIO()
    render(2, SIZE, np.random.default_rng(1)).save(good, "JPEG")
    tar_of(inp / "00002.tar", {"big.png": big.getvalue(), "ppm.png": ppm.getvalue(), "ok.jpg": good.getvalue()})
    memory_key, foreign_key = info.shard_keys[0][1], info.shard_keys[1][0]
    faulty(out, decode_errors={memory_key: "MemoryError", foreign_key: "RuntimeError"})
    limit = len(big.getvalue()) - 1
    summary = run_pretokenize(config(inp, out, tok_dir, max_member_bytes=limit, max_actor_failures=3))
    assert summary.ok, summary.describe()
    skipped = {s["key"]: s["reason"] for st in stats_of(out) for s in st.skipped}
    assert skipped.keys() == {"big", "ppm"}, skipped
    assert skipped["big"] == f"member too large: .png is {len(big.getvalue())} bytes (limit {limit})"
    assert skipped["ppm"].startswith("undecodable image: UnidentifiedImageError")  # PPM is not an allowed format
    got = {k: np.asarray(t) for table in read_output(str(out)).values()
           for k, t in zip(table["key"].to_pylist(), table["tokens"].to_pylist())}
    want = expected_tokens(str(inp), tok_dir, max_member_bytes=limit)
    assert got.keys() == want.keys() and {memory_key, foreign_key, "ok"} <= got.keys()
    assert all(np.array_equal(got[k], want[k]) for k in got)
    attempts = {s.index: s.worker["attempt"] for s in stats_of(out)}
    assert attempts == {0: 2, 1: 2, 2: 1}, attempts  # the two injected errors failed their attempt


# -- 6. commits checked on S3, and 8. hashes and staging leftovers ----------------------------------
def test_lost_and_replaced_s3_objects_are_redone(cluster, s3, dataset, clean, tok_dir):
    bucket = s3.bucket()
    direct = s3.storage_options
    fs = fsspec.filesystem("s3", **direct)
    fs.put(dataset, f"{bucket}/in", recursive=True)
    inp, out = f"s3://{bucket}/in", f"s3://{bucket}/out"
    leftovers = {split: Path(tempfile.gettempdir(), f"{worker_temp_prefix(out)}{split}-00001-of-00006.killed.x.parquet")
                 for split in ("train", "validation")}
    for path in leftovers.values():  # as an actor killed mid-upload leaves them in its node's temp dir
        path.write_bytes(b"PAR1 partial")
    with FaultyS3Proxy(s3.endpoint_url, rate=0, lose_first_put="out/data/train-00001") as proxy:
        summary = run_pretokenize(config(inp, out, tok_dir, storage_options={**direct, "endpoint_url": proxy.url}))
    assert summary.ok and proxy.counts["lose PUT"] == 1, proxy.counts
    assert not leftovers["train"].exists() and leftovers["validation"].exists(), "cleaned another split's files"
    leftovers["validation"].unlink()
    assert_same_tokens(out, clean, direct)
    by_index = {ShardStats.from_json(fs.cat_file(p)).index: ShardStats.from_json(fs.cat_file(p))
                for p in fs.glob(f"{bucket}/out/stats/*.json")}
    assert by_index[1].worker["attempt"] == 2 and all(s.data_etag for s in by_index.values())

    victim = f"{bucket}/out/data/train-00002-of-00006.parquet"
    blob = fs.cat_file(victim)
    fs.pipe_file(victim, blob[:100] + bytes([blob[100] ^ 1]) + blob[101:])  # same size, other bytes
    again = run_pretokenize(config(inp, out, tok_dir, storage_options=direct))
    assert (again.shards_written, again.shards_skipped_done) == (1, SHARDS - 1)
    assert_same_tokens(out, clean, direct)


def test_verify_rehashes_and_leftovers_of_killed_runs_are_cleaned(cluster, dataset, clean, tok_dir, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(clean, out)
    (out / "_tmp").mkdir(exist_ok=True)
    mine = [out / "_tmp" / "train-00003-of-00006.killed.a1.parquet", out / "stats" / "train-00003-of-00006.json.b2.tmp",
            out / "_tmp" / "pretok.json.c3.tmp"]
    theirs = out / "_tmp" / "validation-00000-of-00002.other.d4.parquet"
    for path in (*mine, theirs):
        path.write_bytes(b"partial")
    data = out / "data" / "train-00004-of-00006.parquet"
    blob = data.read_bytes()
    data.write_bytes(blob[:100] + bytes([blob[100] ^ 1]) + blob[101:])  # same size: only a hash tells

    cheap = run_pretokenize(config(dataset, out, tok_dir))
    assert (cheap.shards_written, cheap.shards_skipped_done) == (0, SHARDS)
    assert not any(p.exists() for p in mine) and theirs.exists()
    verified = run_pretokenize(config(dataset, out, tok_dir, verify=True))
    assert (verified.shards_written, verified.shards_skipped_done) == (1, SHARDS - 1)
    assert_same_tokens(str(out), clean)
    for stats in stats_of(out):
        assert stats.data_sha256 == hashlib.sha256(Path(out, "data", stats.shard + ".parquet").read_bytes()).hexdigest()
        assert stats.batch_size == 2 and stats.device_type == "cpu (simulated GPU)" and stats.run_id
    assert pq.read_table(data).num_rows == PER_SHARD


# -- 7. --format auto ----------------------------------------------------------------------------------
def test_format_auto_refuses_an_ambiguous_input(tok_dir, tmp_path):
    inp = tmp_path / "in"
    write_synthetic(str(inp), "imagefolder", num_shards=1, images_per_shard=4, seed=36, image_size=SIZE)
    tar_of(inp / "stray.tar", {"x.jpg": b"not an image"})
    code, _, err = cli(inp, tmp_path / "out", "--tokenizer", tok_dir, *ARGS)
    assert code == 2 and "--format auto found more than one input format" in err, err
    assert "1 webdataset files (e.g. " in err and "/stray.tar)" in err and "4 imagefolder files" in err and "pass --format" in err
    assert not (tmp_path / "out").exists()
