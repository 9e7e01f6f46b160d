"""``pretok inspect``: one output shard's stats, the split's run report (the plots a run draws at
its end, redrawn from the stats and data files), and a contact sheet of originals next to their
reconstructions from the stored tokens.

    pretok inspect OUT [--shard 0] [--split train] [--report-dir DIR | --no-report]
                       [--tokenizer SRC] [--sheet sheet.png]

The originals are re-read from the shard's input and put through the same transform as during
pretokenization; the tokens are decoded with the tokenizer (default: the one recorded in
``pretok.json``, checked against its fingerprint).
"""
from __future__ import annotations

import argparse
import collections
import json
import sys

import numpy as np
import pyarrow.parquet as pq
import torch

from pipeline.decode import decode_record
from pipeline.layout import OutputLayout, filesystem
from pipeline.ledger import Ledger, ShardStats
from pipeline.manifest import run_fingerprint
from pipeline.qa import DEFAULT_QA_MIN_PSNR, QASummary
from pipeline.report import write_report
from pipeline.records import DecodedImage, InputShard
from pipeline.sources import iter_records
from tokenizer import load_tokenizer
from tokenizer.transform import ImageTransform

from .args import storage_options
from .grid import image_grid, to_uint8


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pretok inspect", description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="pretok output dataset (folder or URL)")
    p.add_argument("--split", default="train")
    p.add_argument("--shard", type=int, default=0, help="shard index (default: 0)")
    p.add_argument("--tokenizer", default=None, metavar="SRC",
                   help="tokenizer to decode with: hub repo id org/name[@revision], hf:// URL, folder, fsspec URL or "
                   "bare model.safetensors (default: the source recorded in pretok.json, a hub commit for hub ids)")
    p.add_argument("--sheet", default=None, help="PNG contact sheet to write (default: no sheet)")
    p.add_argument("--max-images", type=int, default=16)
    p.add_argument("--report-dir", default=None, metavar="DIR",
                   help="where to draw the split's run report (default: OUT/report, where the run draws it)")
    p.add_argument("--no-report", action="store_true", help="do not draw the run report")
    p.add_argument("--qa-min-psnr", type=float, default=DEFAULT_QA_MIN_PSNR, metavar="DB",
                   help=f"the QA warning threshold marked on the PSNR plot (default: {DEFAULT_QA_MIN_PSNR:g})")
    p.add_argument("--storage-options", type=storage_options, default=None, metavar="JSON")
    return p


def shard_report(stats: ShardStats) -> str:
    reasons = collections.Counter(s["reason"].split(":")[0] for s in stats.skipped)
    lines = [
        f"shard    {stats.shard}  (input {stats.input_url}, {stats.input_bytes or '?'} bytes)",
        f"rows     {stats.rows_in} in = {stats.rows_written} written + {len(stats.skipped)} skipped",
        f"data     {stats.data_bytes} bytes, {stats.seconds:.2f} s, worker {stats.worker}",
    ]
    lines += [f"skipped  {n} x {reason}" for reason, n in reasons.most_common()]
    if stats.qa_psnr or stats.qa_unavailable:
        lines.append(f"qa       {QASummary.of([stats]).describe()} (every {stats.qa_every})")
    return "\n".join(lines)


def contact_sheet(out: str, layout: OutputLayout, manifest: dict, stats: ShardStats, tok, max_images: int,
                  storage_options: dict | None) -> tuple[np.ndarray, float]:
    """uint8 [2K,H,W,3] (original, reconstruction) pairs and their mean PSNR in dB."""
    fs, _ = filesystem(out, storage_options)
    with fs.open(layout.data_path(stats.index), "rb") as f:
        table = pq.read_table(f, columns=["key", "tokens"]).slice(0, max_images)
    keys = table["key"].to_pylist()
    tokens = np.asarray(table["tokens"].to_pylist(), dtype=np.int64)[:, 0]  # view 0
    info = manifest["splits"][layout.split]
    members = tuple(keys) if info["format"] == "imagefolder" else ()
    shard = InputShard(stats.index, stats.input_url, info["format"], members=members)
    tr = manifest["transform"]
    transform = ImageTransform(tr["resolution"], tr["views"])
    originals = {}
    for rec in iter_records(shard, storage_options):
        if rec.key in keys:
            d = decode_record(rec, transform)
            if isinstance(d, DecodedImage):
                originals[rec.key] = d.views[0]
        if len(originals) == len(keys):
            break
    keep = [i for i, k in enumerate(keys) if k in originals]
    orig = torch.from_numpy(np.stack([originals[keys[i]] for i in keep])).float() / 255
    with torch.no_grad():
        recon = tok.decode_tokens(torch.from_numpy(tokens[keep])).float()
    mse = ((recon.clamp(0, 1) - orig) ** 2).flatten(1).mean(1).clamp_min(1e-10)
    pairs = torch.stack([orig, recon], 1).flatten(0, 1)
    return to_uint8(pairs), float((10 * torch.log10(1 / mse)).mean())


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    so = a.storage_options
    fs, _ = filesystem(a.out, so)
    manifest = json.loads(fs.cat_file(a.out.rstrip("/") + "/pretok.json"))
    if a.split not in manifest["splits"]:
        print(f"pretok: error: no split {a.split!r} in {a.out} (have {sorted(manifest['splits'])})", file=sys.stderr)
        return 2
    layout = OutputLayout(a.out, a.split, manifest["splits"][a.split]["num_shards"])
    try:
        stats = ShardStats.from_json(fs.cat_file(layout.stats_path(a.shard)))
    except FileNotFoundError:
        print(f"pretok: error: shard {a.shard} of {a.split} is not done (no {layout.stats_path(a.shard)})", file=sys.stderr)
        return 2
    print(shard_report(stats))
    if not a.no_report:
        done = Ledger.read(layout, run_fingerprint(manifest, a.split), so).done
        written = write_report(layout, manifest, done, so, a.qa_min_psnr, a.report_dir)
        folder = written[0].rsplit("/", 1)[0]
        print(f"qa       {QASummary.of(done.values()).describe()}")
        print(f"report   {folder}/: {', '.join(w.rsplit('/', 1)[-1] for w in written)} ({len(done)} done shards)")
    if a.sheet:
        tok = load_tokenizer(a.tokenizer or manifest["tokenizer"]["source"], storage_options=so)
        if tok.fingerprint != manifest["tokenizer"]["fingerprint"]:
            print("pretok: error: that tokenizer did not make these tokens (fingerprint differs)", file=sys.stderr)
            return 2
        pairs, psnr = contact_sheet(a.out, layout, manifest, stats, tok, a.max_images, so)
        image_grid(pairs, columns=min(8, len(pairs))).save(a.sheet)
        print(f"sheet    {a.sheet}: {len(pairs) // 2} originals | reconstructions, mean PSNR {psnr:.2f} dB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
