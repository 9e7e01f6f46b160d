"""The one-command demo, reduced: every stage runs and leaves its files under one folder."""
from __future__ import annotations

import json

from PIL import Image

from jobs import cli
from jobs.demo import QUICK, run_demo


def test_quick_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    summary = run_demo(str(out), QUICK, progress=False)
    assert summary["pretokenize"]["rows"] == QUICK.shards * QUICK.images_per_shard
    assert summary["pretokenize"]["skipped"] == 0
    for name in ("images", "tokenizer/model.safetensors", "tokens/pretok.json", "tokens/README.md",
                 "generator", "samples.png", "contact_sheet.png", "summary.json"):
        assert (out / name).exists(), name
    samples = Image.open(out / "samples.png")
    assert samples.size[0] > QUICK.samples_per_class * 32 and samples.size[1] > 4 * 32  # 4 classes x 32 px
    assert json.loads((out / "summary.json").read_text())["samples"] == str(out / "samples.png")
    # a second run reuses every stage's output instead of redoing it
    again = run_demo(str(out), QUICK, progress=False)
    assert again["tokenizer"]["reused"] and again["pretokenize"]["rows"] == summary["pretokenize"]["rows"]


def test_cli_lists_every_command_and_they_all_exist(capsys):
    assert cli.main(["--help"]) == 0
    text = capsys.readouterr().out
    for name, (module, _) in cli.COMMANDS.items():
        assert name in text
        assert callable(__import__(module, fromlist=["main"]).main)
    assert cli.main(["nope"]) == 2
