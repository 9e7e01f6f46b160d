"""The staged data path (``pipeline.feed``): the same tokens as the in-thread path on every source
format (in-process, the actor's code without Ray), a decode worker killed mid-shard costs one retry
and nothing else (real driver and actor), memory bounded by the queues, ``--fast-decode`` recorded
and close to exact. End-to-end runs of every format through the staged path against direct
encoding are ``tests/test_pretokenize.py::test_format_end_to_end``."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.decode import decode_record
from pipeline.distributor import PretokenizeConfig, run_pretokenize
from pipeline.ledger import ShardStats
from pipeline.manifest import ManifestMismatch
from pipeline.records import Record
from pipeline.synthetic import write_synthetic
from pipeline.decodepool import DecodePool
from pipeline.encode import ShardJob, encode_shard
from pipeline.feed import DeviceStage, DeviceTurns, FeedContext
from pipeline.layout import OutputLayout
from pipeline.schema import TokenSchema
from pipeline.sources import list_source
from tests.faults import (
    OutputWatcher, expected_tokens, finish, keyed_tokens, read_output, run_in_thread, wait_until,
)
from tokenizer import load_tokenizer
from tokenizer.transform import ImageTransform

REPO = Path(__file__).resolve().parents[1]


def config(inp, out, tok_dir, **kw) -> PretokenizeConfig:
    base = dict(actors=1, gpus_per_actor=1.0, cpus_per_actor=0.5, batch_size=2, progress=False, images_per_shard=5)
    return PretokenizeConfig(input=str(inp), output=str(out), tokenizer=tok_dir, **{**base, **kw})


def stats_of(out) -> list[ShardStats]:
    return [ShardStats.from_json(p.read_text()) for p in sorted(Path(out, "stats").glob("*.json"))]


@pytest.fixture(scope="module")
def feed(tok_dir):
    """The staged path's shared parts, as an actor holds them (one decode worker process)."""
    tok = load_tokenizer(tok_dir, parts="encoder")
    t = ImageTransform(tok.image_size, "flip")
    ctx = FeedContext(DecodePool(1), DeviceStage(tok, "fp32", 2 * t.num_views, (3, t.resolution, t.resolution)),
                      DeviceTurns())
    ctx.pool.warm(120)
    yield tok, t, ctx
    ctx.pool.close()


@pytest.mark.parametrize("fmt", ["webdataset", "parquet", "imagefolder"])
def test_staged_path_writes_the_tokens_of_the_in_thread_path(feed, tok_dir, tmp_path, fmt):
    tok, transform, ctx = feed
    inp = str(tmp_path / "in")
    write_synthetic(inp, fmt, num_shards=2, images_per_shard=5, bad=True, seed=5)
    listing = list_source(inp, fmt, images_per_shard=5)
    schema = TokenSchema(tok.num_tokens, transform.num_views, listing.has_labels, listing.label_names,
                         listing.has_captions, False, listing.kept)
    written = {}
    for path, feed_ctx in (("staged", ctx), ("in-thread", None)):
        layout = OutputLayout(str(tmp_path / path), "train", listing.num_shards)
        job = ShardJob(layout, schema, {}, "fp", transform, batch_size=2)
        written[path] = [encode_shard(tok, shard, job, feed=feed_ctx) for shard in listing.shards]
    got, want = read_output(str(tmp_path / "staged")), read_output(str(tmp_path / "in-thread"))
    assert got.keys() == want.keys() and len(got) == listing.num_shards >= 2
    for name in want:  # same rows in the same order, byte-identical token columns
        assert got[name]["key"].equals(want[name]["key"]) and got[name]["tokens"].equals(want[name]["tokens"]), name
    direct = expected_tokens(inp, tok_dir, "flip")  # the shared transform + tok.encode, no pipeline
    rows = {k: np.asarray(t) for table in got.values() for k, t in zip(table["key"].to_pylist(),
                                                                        table["tokens"].to_pylist())}
    assert rows.keys() == direct.keys() and all(np.array_equal(rows[k], direct[k]) for k in rows)
    skips = {p: sorted((s["key"], s["reason"]) for st in w for s in st.skipped) for p, w in written.items()}
    assert skips["staged"] == skips["in-thread"] and skips["staged"], skips
    assert [s.rows_in for s in written["staged"]] == [s.rows_in for s in written["in-thread"]]


def _decode_workers_of(actor_pid: int) -> list[int]:
    """The decode worker processes under an actor: children of its fork server child."""
    def children(pid: int) -> list[int]:
        out = []
        for task in Path(f"/proc/{pid}/task").glob("*"):
            try:
                out += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
        return out

    def is_fork_server(pid: int) -> bool:
        try:
            return b"multiprocessing.forkserver" in Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return False
    return [w for s in children(actor_pid) if is_fork_server(s) for w in children(s)]


def test_decode_worker_killed_mid_shard_retries_the_shard_and_loses_nothing(cluster, tok_dir, tmp_path):
    inp, out = tmp_path / "in", tmp_path / "out"
    write_synthetic(str(inp), "webdataset", num_shards=5, images_per_shard=20, seed=8, image_size=(320, 240))
    with OutputWatcher(str(out)) as watcher:
        thread, box = run_in_thread(run_pretokenize, config(inp, out, tok_dir, max_actor_failures=3))
        assert wait_until(lambda: any(Path(out, "stats").glob("*.json")))
        actor = stats_of(out)[0].worker["pid"]
        assert wait_until(lambda: _decode_workers_of(actor), timeout_s=30)
        victims = _decode_workers_of(actor)
        os.kill(victims[0], signal.SIGKILL)
        summary = finish(thread, box)
    assert summary.ok and summary.shards_written == 5 and summary.rows_written == 5 * 20, summary.describe()
    stats = stats_of(out)
    retried = [s for s in stats if s.worker["attempt"] > 1]
    assert retried and all(s.worker["pid"] == actor for s in stats), "the actor is kept, its shard retried"
    assert not any(s.skipped for s in stats), "a dead worker is no undecodable image"
    assert set(_decode_workers_of(actor)).isdisjoint(victims) or not _decode_workers_of(actor)
    assert not watcher.problems, watcher.problems
    got = keyed_tokens(read_output(str(out)))  # every key once, with the tokens of direct encoding
    want = expected_tokens(str(inp), tok_dir)
    assert got.keys() == want.keys() and all(np.array_equal(np.asarray(got[k]), want[k]) for k in want)


def test_queue_bounds_hold_memory_flat_on_large_images(tok_dir, tmp_path):
    """Peak RSS of the actor process and of its decode worker, measured by the kernel (VmHWM and
    ru_maxrss), over a shard whose encoded bytes are several times what the queues may hold."""
    probe = subprocess.run([sys.executable, "-m", "tests.memory_probe", tok_dir, str(tmp_path)], cwd=REPO,
                           capture_output=True, text=True, timeout=240, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert probe.returncode == 0, probe.stderr[-3000:]
    m = json.loads(probe.stdout.strip().splitlines()[-1])
    held = (m["read"] + m["decode"] + 2) * m["batch"]  # records read ahead, in the decode pool, in hand
    bound = held * m["max_image_bytes"] + m["decode"] * m["slab_bytes"] + 32 * 2**20  # + allocator slack
    assert m["shard_bytes"] > 1.5 * bound, m  # reading the shard ahead unbounded would blow the bound
    grew = m["actor_peak"] - m["actor_base"]
    assert grew < bound, f"actor RSS grew by {grew / 2**20:.0f} MiB, bound {bound / 2**20:.0f} MiB: {m}"
    # a worker holds one image at a time: its peak over the big shard is its peak on one image
    assert m["worker_peak"] < m["worker_warm_peak"] + 32 * 2**20, m


def test_fast_decode_keeps_size_and_is_close_to_exact():
    rng = np.random.default_rng(0)
    small = rng.integers(0, 255, (12, 16, 3), np.uint8)
    img = Image.fromarray(small).resize((1600, 1200), Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=92)
    record = Record("k", buf.getvalue())
    t = ImageTransform(256, "center")
    exact, fast = decode_record(record, t), decode_record(record, t, fast=True)
    assert (fast.width, fast.height) == (exact.width, exact.height) == (1600, 1200)
    assert fast.views.shape == exact.views.shape and not np.array_equal(fast.views, exact.views)
    assert np.abs(fast.views.astype(int) - exact.views.astype(int)).mean() < 3
    small_jpeg = io.BytesIO()
    img.resize((400, 300)).save(small_jpeg, "JPEG")  # < 2x the target: decoded exactly
    r = Record("s", small_jpeg.getvalue())
    assert np.array_equal(decode_record(r, t, fast=True).views, decode_record(r, t).views)


def test_fast_decode_is_part_of_the_run_settings(cluster, tok_dir, tmp_path):
    inp, out = tmp_path / "in", tmp_path / "out"
    write_synthetic(str(inp), "webdataset", num_shards=1, images_per_shard=3, seed=9)
    assert run_pretokenize(config(inp, out, tok_dir, fast_decode=True)).ok
    assert json.loads(Path(out, "pretok.json").read_text())["decode"]["fast_decode"] is True
    with pytest.raises(ManifestMismatch, match="decode"):
        run_pretokenize(config(inp, out, tok_dir))
