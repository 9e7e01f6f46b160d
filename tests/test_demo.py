"""The one-command demo, reduced: every stage runs and leaves its files under one folder, the
tokenizer reconstructs held-out images and the generated samples show their class."""
from __future__ import annotations

import json

from PIL import Image

from jobs import cli
from jobs.demo import NUM_CLASSES, QUICK, _prepare_tokenizer, run_demo
from tokenizer import load_tokenizer

# Floors set from what the reduced demo reaches (see the README's quick start for the full demo).
QUICK_PSNR_FLOOR_DB = 27.0  # reached: 28.7 (32 held-out images)
QUICK_CLASS_ACCURACY_FLOOR = 0.75  # reached: 1.0 of 32 samples (chance: 0.25)


def test_quick_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    summary = run_demo(str(out), QUICK, progress=False)
    assert summary["pretokenize"]["rows"] == QUICK.shards * QUICK.images_per_shard
    assert summary["pretokenize"]["skipped"] == 0
    for name in ("images", "tokenizer/model.safetensors", "tokens/pretok.json", "tokens/README.md",
                 "generator", "samples.png", "contact_sheet.png", "summary.json"):
        assert (out / name).exists(), name
    samples = Image.open(out / "samples.png")
    columns = min(8, QUICK.samples_per_class)
    assert samples.size[0] > columns * 64 and samples.size[1] > NUM_CLASSES * 64
    assert json.loads((out / "summary.json").read_text())["samples"] == str(out / "samples.png")
    assert summary["heldout_psnr_db"] >= QUICK_PSNR_FLOOR_DB
    check = summary["class_check"]
    assert check["samples"] == NUM_CLASSES * QUICK.samples_per_class
    assert check["classifier_accuracy_on_real_heldout"] >= 0.95
    assert check["accuracy"] >= QUICK_CLASS_ACCURACY_FLOOR
    # a second run reuses every stage's output instead of redoing it
    again = run_demo(str(out), QUICK, progress=False)
    assert again["tokenizer"]["reused"] and again["pretokenize"]["rows"] == summary["pretokenize"]["rows"]


def test_train_tokenizer_option_trains_a_loadable_one(tmp_path):
    summary = _prepare_tokenizer(tmp_path, QUICK, train=True, progress=False)
    assert summary["steps_done"] == QUICK.tokenizer_steps and not summary["reused"]
    tok = load_tokenizer(str(tmp_path))
    assert (tok.image_size, tok.num_tokens) == (64, summary["tokens"])
    assert _prepare_tokenizer(tmp_path, QUICK, train=True, progress=False)["reused"]


def test_cli_lists_every_command_and_they_all_exist(capsys):
    assert cli.main(["--help"]) == 0
    text = capsys.readouterr().out
    for name, (module, _) in cli.COMMANDS.items():
        assert name in text
        assert callable(__import__(module, fromlist=["main"]).main)
    assert cli.main(["nope"]) == 2
