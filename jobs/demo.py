"""``pretok demo``: the whole path on built-in sample data, everything under one folder.

sample images (4 classes) -> the shipped demo TiTok (or one trained with --train-tokenizer) ->
pretokenize on a local Ray cluster -> a small masked generator trained briefly on the token
shards -> samples decoded, and checked: held-out reconstruction PSNR of the tokenizer and the
class accuracy of generated samples (a nearest-centroid classifier fitted on real images).
Runs on CPU; ``--quick`` is a reduced version for tests.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import asdict, dataclass, replace
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from generator.checkpoint import load_generator, sampler_defaults
from jobs.grid import image_grid, to_uint8
from pipeline.distributor import PretokenizeConfig, run_pretokenize
from pipeline.synthetic_images import CLASSES, write_samples
from tokenizer import load_tokenizer

from . import inspect, train_generator
from .class_check import NearestCentroid
from .sample import sample_tokens
from .train_tokenizer import HELDOUT_SEED, TrainSpec, psnr, reconstruct, sample_tensors, train_tokenizer

DATA_SEED = 7          # the demo's sample images (the shipped tokenizer was trained on seed 0)
CLASSIFIER_SEED = 11   # real images the class check is fitted on
# Gumbel noise at the first sampling step (annealed to 0): 1.0 rather than the sampler's 4.5, since a
# generator trained for a few hundred steps does best close to its most likely tokens.
SAMPLE_TEMPERATURE = 1.0
NUM_CLASSES = len(CLASSES)


def shipped_tokenizer() -> Path:
    """The demo TiTok shipped as package data (jobs/demo_tokenizer)."""
    return Path(str(resources.files("jobs") / "demo_tokenizer"))


@dataclass(frozen=True)
class DemoSize:
    shards: int
    images_per_shard: int
    generator_steps: int
    generator_batch: int
    samples_per_class: int     # generated for the class check; the grid shows up to 8 per class
    heldout: int               # held-out images for the PSNR report
    classifier_images: int     # real images the classifier is fitted on
    tokenizer_steps: int       # only with --train-tokenizer


FULL = DemoSize(shards=8, images_per_shard=128, generator_steps=560, generator_batch=32, samples_per_class=16,
                heldout=256, classifier_images=400, tokenizer_steps=TrainSpec().steps)
QUICK = DemoSize(shards=2, images_per_shard=32, generator_steps=150, generator_batch=16, samples_per_class=8,
                 heldout=32, classifier_images=80, tokenizer_steps=5)
GRID_COLUMNS = 8


def _step(name: str, t0: float) -> None:
    print(f"[demo {time.time() - t0:6.1f}s] {name}", flush=True)


def _prepare_tokenizer(tok_dir: Path, size: DemoSize, train: bool, progress: bool) -> dict:
    """The shipped tokenizer copied into the output folder, or one trained on sample images."""
    summary_file = tok_dir / "train_summary.json"
    if summary_file.exists():
        previous = json.loads(summary_file.read_text())
        if previous.get("demo_trained", False) == train:
            return {**previous, "reused": True}
    if not train:
        tok_dir.mkdir(parents=True, exist_ok=True)
        for name in ("config.json", "model.safetensors", "train_summary.json"):
            shutil.copyfile(shipped_tokenizer() / name, tok_dir / name)
        return {**json.loads(summary_file.read_text()), "reused": False}
    spec = replace(TrainSpec(), steps=size.tokenizer_steps)
    images, _ = sample_tensors(size.shards * size.images_per_shard, DATA_SEED, spec.image_size)
    held, _ = sample_tensors(size.heldout, HELDOUT_SEED, spec.image_size)
    return {**train_tokenizer(images, held, str(tok_dir), spec, progress=progress, extra={"demo_trained": True}),
            "reused": False}


def heldout_psnr(tokenizer, count: int) -> float:
    """Mean PSNR (dB) of held-out sample images reconstructed through their token ids."""
    held, _ = sample_tensors(count, HELDOUT_SEED, tokenizer.image_size)
    held = held.float() / 255
    return round(psnr(reconstruct(tokenizer, held), held).mean().item(), 2)


def class_check(tokenizer, gen_dir: Path, size: DemoSize, grid_png: Path) -> dict:
    """Sample every class, decode, classify with a classifier fitted on real images; write the grid."""
    model, config = load_generator(gen_dir)
    sampler = replace(sampler_defaults(config), temperature=SAMPLE_TEMPERATURE)
    ids = sample_tokens(model, list(range(NUM_CLASSES)), size.samples_per_class, sampler, seed=0, batch_size=64)
    with torch.no_grad():
        generated = to_uint8(tokenizer.decode_tokens(ids))
    labels = np.repeat(np.arange(NUM_CLASSES), size.samples_per_class)
    real, real_labels = sample_tensors(size.classifier_images, CLASSIFIER_SEED, tokenizer.image_size)
    classifier = NearestCentroid.fit(real.permute(0, 2, 3, 1).numpy(), real_labels.numpy())
    held, held_labels = sample_tensors(size.classifier_images, HELDOUT_SEED, tokenizer.image_size)
    predicted = classifier.predict(generated)
    columns = min(GRID_COLUMNS, size.samples_per_class)
    shown = generated.reshape(NUM_CLASSES, size.samples_per_class, *generated.shape[1:])[:, :columns]
    image_grid(shown.reshape(-1, *generated.shape[1:]), columns).save(grid_png)
    return {
        "accuracy": round(float((predicted == labels).mean()), 3),
        "per_class": [round(float((predicted[labels == c] == c).mean()), 3) for c in range(NUM_CLASSES)],
        "samples": len(labels),
        "classifier_accuracy_on_real_heldout": round(
            classifier.accuracy(held.permute(0, 2, 3, 1).numpy(), held_labels.numpy()), 3),
    }


def run_demo(out: str, size: DemoSize, progress: bool = True, train_tokenizer_too: bool = False) -> dict:
    """Run every stage; stages whose output already exists are reused. Returns the summary."""
    t0 = time.time()
    root = Path(out).resolve()
    images, tok_dir, tokens, gen_dir = root / "images", root / "tokenizer", root / "tokens", root / "generator"
    summary: dict = {"output": str(root), "size": asdict(size)}

    _step(f"sample data: {size.shards} webdataset shards x {size.images_per_shard} images, {NUM_CLASSES} classes", t0)
    if not list(images.glob("*.tar")):
        write_samples(str(images), size.shards, size.images_per_shard, seed=DATA_SEED)

    _step("tokenizer: " + ("training a demo TiTok" if train_tokenizer_too else "the shipped demo TiTok"), t0)
    summary["tokenizer"] = _prepare_tokenizer(tok_dir, size, train_tokenizer_too, progress)
    tokenizer = load_tokenizer(str(tok_dir))
    summary["heldout_psnr_db"] = heldout_psnr(tokenizer, size.heldout)

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
            "--width", "128", "--depth", "2", "--heads", "4", "--lr", "3e-3", "--dropout", "0", "--workers", "0",
            "--resume", "--save-every", str(size.generator_steps)]
    if train_generator.main(args + ([] if progress else ["--no-progress"])) != 0:
        raise RuntimeError("generator training failed")

    _step("sampling, decoding and the class check", t0)
    samples_png, sheet_png = root / "samples.png", root / "contact_sheet.png"
    summary["class_check"] = class_check(tokenizer, gen_dir, size, samples_png)
    if inspect.main([str(tokens), "--sheet", str(sheet_png), "--max-images", "16", "--no-report"]) != 0:
        raise RuntimeError("inspect failed")
    summary.update(samples=str(samples_png), contact_sheet=str(sheet_png), seconds=round(time.time() - t0, 1))
    (root / "summary.json").write_text(json.dumps(summary, indent=1))
    _step(f"done: everything is under {root}", t0)
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pretok demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="pretok-demo", help="output folder (default: ./pretok-demo)")
    p.add_argument("--train-tokenizer", action="store_true",
                   help="train a demo TiTok on the sample images instead of using the shipped one "
                   "(the shipped recipe: about an hour on one CPU core)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, for tests (seconds, meaningless images)")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    s = run_demo(a.out, QUICK if a.quick else FULL, progress=not a.no_progress, train_tokenizer_too=a.train_tokenizer)
    tok, cls = s["tokenizer"], s["class_check"]
    names = ", ".join(f"{c.name} {acc:.0%}" for c, acc in zip(CLASSES, cls["per_class"]))
    print(
        f"\ntokenizer   held-out reconstruction PSNR {s['heldout_psnr_db']} dB "
        f"(predicting the mean image: {tok['baseline_psnr_db']} dB), {tok['codes_used']}/{tok['codebook']} codes used\n"
        f"tokens      {s['pretokenize']['rows']} images x 2 views in {s['output']}/tokens\n"
        f"generator   class accuracy of {cls['samples']} samples {cls['accuracy']:.0%} ({names}; "
        f"the classifier scores {cls['classifier_accuracy_on_real_heldout']:.0%} on real held-out images)\n"
        f"samples     {s['samples']} (one class per row)\n"
        f"originals | reconstructions  {s['contact_sheet']}\n"
        f"total       {s['seconds']} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
