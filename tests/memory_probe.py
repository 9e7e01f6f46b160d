"""Peak memory of the staged path on a shard of large images, in a fresh process (the "actor").

  python -m tests.memory_probe TOK_DIR WORK_DIR   -> one JSON line

The process writes a webdataset shard of large noise JPEGs, warms the decode pool up on two of
them, resets its own peak RSS (``/proc/self/clear_refs``), runs the big shard through
``encode_shard`` with one decode worker and reports its RSS before, its peak (VmHWM) after, the
worker's peak (``ru_maxrss``) after warm-up and after the shard, and the queue bounds.
"""
from __future__ import annotations

import io
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.decodepool import DecodePool
from pipeline.encode import ShardJob, encode_shard
from pipeline.feed import DeviceStage, DeviceTurns, FeedBounds, FeedContext
from pipeline.layout import OutputLayout
from pipeline.records import InputShard
from pipeline.schema import TokenSchema
from tokenizer import load_tokenizer
from tokenizer.transform import ImageTransform

SIZE, IMAGES, BATCH = (1600, 1200), 64, 2


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _shard(path: Path, n: int, rng) -> int:
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (SIZE[1], SIZE[0], 3), np.uint8)).save(buf, "JPEG", quality=90)
            info = tarfile.TarInfo(f"{i:05d}.jpg")
            info.size = buf.tell()
            buf.seek(0)
            tar.addfile(info, buf)
    return path.stat().st_size


def main(tok_dir: str, work: str) -> None:
    work_dir = Path(work)
    rng = np.random.default_rng(0)
    warm_bytes = _shard(work_dir / "warm.tar", 2, rng)
    shard_bytes = _shard(work_dir / "big.tar", IMAGES, rng)
    tok = load_tokenizer(tok_dir, parts="encoder")
    transform = ImageTransform(tok.image_size, "center")
    layout = OutputLayout(str(work_dir / "out"), "train", 2)
    schema = TokenSchema(tok.num_tokens, 1, False, None, False, False, ())
    job = ShardJob(layout, schema, {}, "fp", transform, BATCH)
    view = (3, transform.resolution, transform.resolution)
    feed = FeedContext(DecodePool(1), DeviceStage(tok, "fp32", BATCH, view), DeviceTurns())
    feed.pool.warm(120)
    encode_shard(tok, InputShard(0, str(work_dir / "warm.tar"), "webdataset", warm_bytes), job, feed=feed)
    worker_warm_peak = max(feed.pool.peak_rss.values())
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS now
    base = _status("VmRSS")
    stats = encode_shard(tok, InputShard(1, str(work_dir / "big.tar"), "webdataset", shard_bytes), job, feed=feed)
    peak = _status("VmHWM")
    bounds = FeedBounds.of(1, BATCH)
    with tarfile.open(work_dir / "big.tar") as tar:
        largest = max(m.size for m in tar.getmembers())
    feed.pool.close()
    print(json.dumps({
        "rows": stats.rows_written, "shard_bytes": shard_bytes, "max_image_bytes": largest,
        "batch": BATCH, "read": bounds.read, "decode": bounds.decode, "slab_bytes": BATCH * int(np.prod(view)),
        "actor_base": base, "actor_peak": peak,
        "worker_warm_peak": worker_warm_peak, "worker_peak": max(feed.pool.peak_rss.values()),
    }))
    assert stats.rows_written == IMAGES


if __name__ == "__main__":
    main(*sys.argv[1:3])
