"""End-to-end pretokenize throughput against a bare in-process decode+encode loop, and token
bytes on disk against the entropy bound N*log2(C)/8, measured in one run on the same data.

  python bench/pipeline.py [--shards 8] [--per-shard 128] [--width 256] [--depth 4]

Data: synthetic 500x375 JPEGs in webdataset shards. Tokenizer: a randomly initialised TiTok
(256 px, patch 16, 32 tokens, 4096 codes) of the given width/depth, so decode and encode costs
are both visible on a CPU. The pipeline runs on a local Ray cluster that is already up (cluster
start-up is not counted; actor start-up and model loading are).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import ray
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from jobs.train_tokenizer import small_titok_config  # noqa: E402
from pipeline.decode import decode_record  # noqa: E402
from pipeline.distributor import PretokenizeConfig, run_pretokenize  # noqa: E402
from pipeline.encode import encode_views  # noqa: E402
from pipeline.layout import OutputLayout  # noqa: E402
from pipeline.ledger import ShardStats  # noqa: E402
from pipeline.records import DecodedImage  # noqa: E402
from pipeline.schema import TokenSchema  # noqa: E402
from pipeline.sources import iter_records, list_source  # noqa: E402
from pipeline.synthetic import write_synthetic  # noqa: E402
from pipeline.writer import ShardWriter  # noqa: E402
from tokenizer import build_tokenizer, load_tokenizer  # noqa: E402
from tokenizer.transform import ImageTransform  # noqa: E402


def make_tokenizer(dest: Path, width: int, depth: int) -> str:
    torch.manual_seed(0)
    cfg = small_titok_config(256, 16, 32, 4096, width, depth)
    tok = build_tokenizer(cfg)
    dest.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tok.state_dict().items()}, str(dest / "model.safetensors"))
    (dest / "config.json").write_text(json.dumps(cfg))
    return str(dest)


def bare_loop(data: str, tok_dir: str, batch: int) -> tuple[int, float]:
    """Decode + encode every image in this process, one batch at a time, no overlap, no writes."""
    t0 = time.perf_counter()
    tok = load_tokenizer(tok_dir, parts="encoder")
    transform = ImageTransform(tok.image_size, "center")
    n, pending = 0, []
    for shard in list_source(data).shards:
        for rec in iter_records(shard):
            d = decode_record(rec, transform)
            if isinstance(d, DecodedImage):
                pending.append(d)
            if len(pending) == batch:
                encode_views(tok, pending, "fp32")
                n, pending = n + len(pending), []
    if pending:
        encode_views(tok, pending, "fp32")
        n += len(pending)
    return n, time.perf_counter() - t0


def tokens_bytes(files: list[Path]) -> int:
    total = 0
    for f in files:
        md = pq.ParquetFile(f).metadata
        for rg in range(md.num_row_groups):
            for c in range(md.num_columns):
                col = md.row_group(rg).column(c)
                if col.path_in_schema.startswith("tokens"):
                    total += col.total_compressed_size
    return total


def uniform_ids_ratio(tmp: Path, rows: int, n: int, v: int, codebook: int) -> float:
    """Bytes/bound for uniformly random ids (incompressible: the writer's worst case)."""
    layout = OutputLayout(str(tmp / "uniform"), "train", 1)
    w = ShardWriter(layout, 0, TokenSchema(n, v), {"bench": True})
    ids = np.random.default_rng(0).integers(0, codebook, (rows, v, n), dtype=np.uint16)
    w.write([DecodedImage(f"k{i}", None, 1, 1) for i in range(rows)], ids)
    w.commit(ShardStats(0, layout.shard_name(0), "-", None, rows, rows))
    return tokens_bytes([Path(layout.data_path(0))]) / (rows * v * n * math.log2(codebook) / 8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--per-shard", type=int, default=128)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    tmp = Path(tempfile.mkdtemp(prefix="pretok-bench-"))
    data = str(tmp / "data")
    write_synthetic(data, "webdataset", num_shards=args.shards, images_per_shard=args.per_shard,
                    image_size=(500, 375), seed=0)
    tok_dir = make_tokenizer(tmp / "tok", args.width, args.depth)
    cores = os.cpu_count()
    ray.init(include_dashboard=False, logging_level="WARNING")

    n_bare, t_bare = bare_loop(data, tok_dir, args.batch)
    t0 = time.perf_counter()
    summary = run_pretokenize(PretokenizeConfig(data, str(tmp / "out"), tok_dir, batch_size=args.batch,
                                                actors=1, cpus_per_actor=cores, progress=False))
    t_pipe = time.perf_counter() - t0
    ray.shutdown()
    assert summary.ok and summary.rows_written == n_bare

    files = sorted((tmp / "out" / "data").glob("*.parquet"))
    bound = summary.rows_written * 32 * math.log2(4096) / 8
    ratio_bytes = tokens_bytes(files) / bound
    ratio_file = sum(f.stat().st_size for f in files) / bound
    worst = uniform_ids_ratio(tmp, 8192, 32, 1, 4096)
    rate_bare, rate_pipe = n_bare / t_bare, summary.rows_written / t_pipe
    print(f"# pipeline bench {date.today()} on {platform.machine()} {cores} cores, torch {torch.__version__}")
    print(f"# {n_bare} synthetic 500x375 JPEGs in {args.shards} shards; TiTok w{args.width} d{args.depth} "
          f"256px/32 tokens/4096 codes, random weights, batch {args.batch}, fp32 CPU")
    print("| measure | value |\n|---|---|")
    print(f"| bare decode+encode loop | {rate_bare:.1f} img/s |")
    print(f"| pretokenize (1 actor, Ray, writes + commits) | {rate_pipe:.1f} img/s |")
    print(f"| **throughput ratio** (goal >= 0.85) | **{rate_pipe / rate_bare:.2f}** |")
    print(f"| token column bytes / N*log2(C)/8, this run | {ratio_bytes:.3f} |")
    print(f"| whole files / bound, this run (keys, sizes, labels, footer) | {ratio_file:.3f} |")
    print(f"| **token bytes / bound, uniform random ids** (goal <= 1.10) | **{worst:.3f}** |")


if __name__ == "__main__":
    main()
