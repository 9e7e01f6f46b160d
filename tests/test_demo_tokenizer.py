"""The shipped demo TiTok: loads like any checkpoint, reconstructs held-out sample images above
the floor, and records how it was trained."""
from __future__ import annotations

import json
import shlex

from jobs.demo import heldout_psnr, shipped_tokenizer
from jobs.train_tokenizer import HELDOUT_SEED, build_parser
from tokenizer import load_tokenizer

# Set from what the shipped weights reach (train_summary.json: heldout_psnr_db, 256 images), less a
# margin for the smaller held-out subset measured here.
PSNR_FLOOR_DB = 18.0
MAX_BYTES = 4 << 20


def test_shipped_tokenizer_loads_and_meets_the_psnr_floor():
    folder = shipped_tokenizer()
    assert (folder / "model.safetensors").stat().st_size < MAX_BYTES
    tok = load_tokenizer(str(folder))
    assert (tok.image_size, tok.codebook_size) == (64, 1024)
    assert heldout_psnr(tok, 64) >= PSNR_FLOOR_DB


def test_training_command_and_seed_are_recorded():
    summary = json.loads((shipped_tokenizer() / "train_summary.json").read_text())
    argv = shlex.split(summary["command"])
    assert argv[:2] == ["pretok", "train-tokenizer"]
    args = build_parser().parse_args(argv[2:])
    assert args.data is None and args.seed == summary["seed"] and summary["heldout_seed"] == HELDOUT_SEED
    assert (args.steps, args.tokens, args.codebook, args.width) == (
        summary["steps"], summary["tokens"], summary["codebook"], summary["width"])
    assert summary["heldout_psnr_db"] >= PSNR_FLOOR_DB
