"""``pretok demo``: the whole path on built-in sample data, everything under one folder.

synthetic labelled images -> small TiTok trained (or reused) -> pretokenize on a local Ray
cluster -> masked generator trained on the token shards -> sample grid + contact sheet PNGs.
Runs on CPU; ``--quick`` is a reduced version for tests.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.distributor import PretokenizeConfig, run_pretokenize
from pipeline.synthetic import write_synthetic

from . import inspect, sample, train_generator
from .train_tokenizer import train_tokenizer


@dataclass(frozen=True)
class DemoSize:
    shards: int
    images_per_shard: int
    tokenizer_steps: int
    generator_steps: int
    samples_per_class: int
    generator_batch: int


FULL = DemoSize(shards=8, images_per_shard=128, tokenizer_steps=1500, generator_steps=1500, samples_per_class=8,
                generator_batch=64)
QUICK = DemoSize(shards=2, images_per_shard=24, tokenizer_steps=30, generator_steps=20, samples_per_class=2,
                 generator_batch=16)
NUM_CLASSES = 4


def _step(name: str, t0: float) -> None:
    print(f"[demo {time.time() - t0:6.1f}s] {name}", flush=True)


def run_demo(out: str, size: DemoSize, progress: bool = True) -> dict:
    """Run every stage; stages whose output already exists are reused. Returns the summary."""
    t0 = time.time()
    root = Path(out).resolve()
    images, tok_dir, tokens, gen_dir = root / "images", root / "tokenizer", root / "tokens", root / "generator"
    summary: dict = {"output": str(root), "size": asdict(size)}

    _step(f"sample data: {size.shards} webdataset shards x {size.images_per_shard} images, {NUM_CLASSES} classes", t0)
    if not list(images.glob("*.tar")):
        write_synthetic(str(images), "webdataset", num_shards=size.shards, images_per_shard=size.images_per_shard,
                        num_classes=NUM_CLASSES, image_size=(64, 48), seed=0)

    _step("tokenizer: single-stage TiTok, 32 px, 16 tokens, 256 codes", t0)
    trained = tok_dir / "train_summary.json"
    if trained.exists() and json.loads(trained.read_text())["steps"] == size.tokenizer_steps:
        summary["tokenizer"] = {**json.loads(trained.read_text()), "reused": True}
    else:
        summary["tokenizer"] = train_tokenizer(str(images), str(tok_dir), steps=size.tokenizer_steps, progress=progress)

    _step("pretokenize on a local Ray cluster (views: center + flip)", t0)
    run = run_pretokenize(PretokenizeConfig(input=str(images), output=str(tokens), tokenizer=str(tok_dir),
                                            views="flip", batch_size=64, progress=progress))
    print(run.describe())
    summary["pretokenize"] = {"rows": run.rows_written, "skipped": run.rows_skipped, "shards": run.shards_total,
                              "seconds": round(run.seconds, 1)}
    if not run.ok:
        raise RuntimeError(f"pretokenize left {len(run.shards_failed)} shards failed")

    _step(f"generator: {size.generator_steps} steps on the token shards", t0)
    args = [str(tokens), str(gen_dir), "--steps", str(size.generator_steps), "--batch-size", str(size.generator_batch),
            "--width", "128", "--depth", "3", "--heads", "4", "--workers", "0", "--resume",
            "--save-every", str(size.generator_steps)]
    if train_generator.main(args + ([] if progress else ["--no-progress"])) != 0:
        raise RuntimeError("generator training failed")

    _step("sampling and decoding", t0)
    samples_png, sheet_png = root / "samples.png", root / "contact_sheet.png"
    if sample.main([str(gen_dir), "--tokenizer", str(tok_dir), "--out", str(samples_png),
                    "--per-class", str(size.samples_per_class)]) != 0:
        raise RuntimeError("sampling failed")
    if inspect.main([str(tokens), "--sheet", str(sheet_png), "--max-images", "16"]) != 0:
        raise RuntimeError("inspect failed")
    summary.update(samples=str(samples_png), contact_sheet=str(sheet_png), seconds=round(time.time() - t0, 1))
    (root / "summary.json").write_text(json.dumps(summary, indent=1))
    _step(f"done: everything is under {root}", t0)
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pretok demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="pretok-demo", help="output folder (default: ./pretok-demo)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, for tests (seconds, meaningless images)")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    summary = run_demo(a.out, QUICK if a.quick else FULL, progress=not a.no_progress)
    tok = summary["tokenizer"]
    print(
        f"\ntokenizer   recon MSE {tok['recon_mse']} (predicting the mean: {tok['baseline_mse']}), "
        f"{tok['codes_used']}/{tok['codebook_size']} codes used\n"
        f"tokens      {summary['pretokenize']['rows']} images x 2 views in {summary['output']}/tokens\n"
        f"samples     {summary['samples']}\n"
        f"originals | reconstructions  {summary['contact_sheet']}\n"
        f"total       {summary['seconds']} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
