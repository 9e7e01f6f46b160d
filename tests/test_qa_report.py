"""QA during pretokenization and the run report, on a real local Ray cluster (2 fake GPUs).

One run of a small image folder (3 shards of coloured squares, a TiTok trained on such images)
feeds most assertions: QA values in the stats files (checked against an independent decode), the
card, the report files; then one shard is taken back and the run resumed, and the report must still
show the full counts. A copy of the tokenizer with shuffled codebook values must trigger the warning.
"""
from __future__ import annotations

import io
import json
import logging
import math
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from jobs.inspect import main as inspect_main
from pipeline.decode import decode_record
from pipeline.distributor import PretokenizeConfig, run_pretokenize
from pipeline.ledger import ShardStats
from pipeline.qa import DEFAULT_QA_MIN_PSNR, QASummary, ShardQA, psnr
from pipeline.records import DecodedImage
from pipeline.report import PLOTS
from tests.faults import expected_tokens
from tests.qa_fixtures import CLASSES, QA_TITOK, shuffled_codebook, write_squares
from tests.test_flextok_counts import write_flextok_checkpoint
from tests.titok_fixtures import titok_config
from tokenizer import build_tokenizer, load_tokenizer
from tokenizer.flextok.counts import TokenCountSettings, image_noise, noise_shape, reconstruction_mse
from tokenizer.transform import ImageTransform

PER_CLASS = 6   # 18 images, 3 shards of 6
QA_EVERY = 2
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def inp(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("squares")
    write_squares(root, PER_CLASS, seed=7)  # not the training images (seed 1234)
    return str(root)


def config(inp: str, out: str, tok: str, **kw) -> PretokenizeConfig:
    base = dict(actors=1, gpus_per_actor=1.0, cpus_per_actor=0.5, batch_size=4, progress=False, images_per_shard=6,
                format="imagefolder", qa_every=QA_EVERY)
    return PretokenizeConfig(input=inp, output=out, tokenizer=tok, **{**base, **kw})


def stats_of(out: str) -> list[ShardStats]:
    return [ShardStats.from_json(p.read_text()) for p in sorted(Path(out, "stats").glob("train-*.json"))]


def report_json(folder: str | Path) -> dict:
    return json.loads(Path(folder, "train-report.json").read_text())


def assert_png(path: Path) -> Image.Image:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    Image.open(io.BytesIO(data)).verify()
    return Image.open(io.BytesIO(data))


@pytest.fixture(scope="module")
def run(cluster, inp, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("out"))
    summary = run_pretokenize(config(inp, out, str(QA_TITOK)))
    assert summary.ok and summary.shards_written == 3 and summary.rows_written == 3 * PER_CLASS
    return out, summary


def test_qa_values_in_stats_match_an_independent_decode(run, inp):
    out, summary = run
    tok = load_tokenizer(str(QA_TITOK))
    transform = ImageTransform(tok.image_size, "center")
    for st in stats_of(out):
        table = pq.read_table(Path(out, "data", st.shard + ".parquet"), columns=["key", "tokens"])
        keys = table["key"].to_pylist()
        assert st.qa_every == QA_EVERY and st.qa_unavailable is None
        assert st.qa_keys == keys[::QA_EVERY]  # every K-th written row of the shard, from its first
        assert len(st.qa_psnr) == math.ceil(st.rows_written / QA_EVERY)
        assert st.started_at <= st.finished_at and st.worker["actor_id"]
        # Recompute: the input view through the shared transform, the stored tokens decoded.
        views = torch.stack([torch.from_numpy(_view(Path(inp, k), transform)) for k in st.qa_keys]).float() / 255
        ids = torch.tensor([table["tokens"][keys.index(k)].as_py()[0] for k in st.qa_keys])
        with torch.no_grad():
            want = psnr(tok.decode_tokens(ids), views)
        np.testing.assert_allclose(st.qa_psnr, want.numpy(), atol=0.01)
        thumbs = assert_png(Path(out, "stats", st.shard + ".qa.png"))
        assert st.qa_thumbnails == len(st.qa_keys) and thumbs.size == (2 * 32, 32 * st.qa_thumbnails)
    # QA reads the tokens, it does not change them.
    got = {k: np.asarray(t) for f in sorted(Path(out, "data").glob("*.parquet"))
           for k, t in zip(*pq.read_table(f, columns=["key", "tokens"]).to_pydict().values())}
    want = expected_tokens(inp, str(QA_TITOK))
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
    qa = summary.qa
    assert qa.count == 3 * math.ceil(PER_CLASS / QA_EVERY) and qa.mean > DEFAULT_QA_MIN_PSNR
    assert summary.qa_warning is None and "qa       9 images decoded back" in summary.describe()


def _view(path: Path, transform: ImageTransform) -> np.ndarray:
    from pipeline.records import Record

    d = decode_record(Record(path.name, path.read_bytes()), transform)
    assert isinstance(d, DecodedImage)
    return d.views[0]


def test_card_and_report_then_resume_keeps_full_counts(run, inp, tmp_path):
    out, summary = run
    card = Path(out, "README.md").read_text()
    qa = summary.qa
    assert f"{qa.count} images: mean {qa.mean:.2f}, p5 {qa.p5:.2f}, p50 {qa.p50:.2f}, p95 {qa.p95:.2f}" in card
    assert f"report   {out}/report/" in summary.describe()
    for name in PLOTS:
        assert f"(report/train-{name}.png)" in card
        assert_png(Path(out, "report", f"train-{name}.png"))
    full = report_json(Path(out, "report"))
    assert full["rows_written"] == 3 * PER_CLASS and full["shards_done"] == 3
    assert full["classes"] == {c: PER_CLASS for c in CLASSES}
    assert full["qa"]["count"] == qa.count and len(full["sheet"]) == qa.count
    assert sum(len(v) for v in full["actors"].values()) == 3
    assert full["codebook"]["rows_read"] == 3 * PER_CLASS and 1 < full["codebook"]["views"][0]["perplexity"] <= 64

    # Resume: shard 1 is taken back (as if the run had died before its commit) and the report removed.
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    st1 = stats_of(str(resumed))[1]
    for f in (Path(resumed, "stats", st1.shard + ".json"), Path(resumed, "stats", st1.shard + ".qa.png"),
              Path(resumed, "data", st1.shard + ".parquet")):
        f.unlink()
    shutil.rmtree(resumed / "report")
    again = run_pretokenize(config(inp, str(resumed), str(QA_TITOK)))
    assert again.shards_written == 1 and again.shards_skipped_done == 2
    assert replace(again.qa, seconds=0) == replace(summary.qa, seconds=0)  # all done shards, not this run's
    after = report_json(resumed / "report")
    assert len({a for a in after["actors"]} - set(full["actors"])) >= 1  # the new run's actor is in it
    for key in ("rows_in", "rows_written", "shards_done", "classes", "qa_psnr", "sheet", "skip_reasons"):
        assert after[key] == full[key], key
    assert {**after["qa"], "seconds": 0} == {**full["qa"], "seconds": 0}
    assert sum(len(v) for v in after["actors"].values()) == 3

    # `pretok inspect OUT` draws the same report.
    elsewhere = tmp_path / "inspected"
    assert inspect_main([str(resumed), "--report-dir", str(elsewhere)]) == 0
    assert report_json(elsewhere) == after
    for name in PLOTS:
        assert_png(elsewhere / f"train-{name}.png")


def test_shuffled_codebook_triggers_the_warning(cluster, inp, tmp_path, run):
    bad = shuffled_codebook(QA_TITOK, tmp_path / "bad")
    logger = logging.getLogger("pretok")
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        summary = run_pretokenize(config(inp, str(tmp_path / "out"), str(bad), qa_every=3))
    finally:
        logger.removeHandler(handler)
    assert summary.ok and summary.qa.mean < DEFAULT_QA_MIN_PSNR < run[1].qa.mean
    text = "\n".join(r.getMessage() for r in records)
    assert "QA WARNING" in text and f"mean PSNR {summary.qa.mean:.2f} dB" in text
    for cause in ("wrong checkpoint", "wrong resolution", "wrong normalisation"):
        assert cause in text and cause in summary.describe()
    card = Path(tmp_path, "out", "README.md").read_text()
    assert f"mean {summary.qa.mean:.2f}" in card


def _images(n: int, size: int, seed: int = 0) -> list[DecodedImage]:
    rng = np.random.default_rng(seed)
    return [DecodedImage(f"k{i}", rng.integers(0, 256, (1, 3, size, size), dtype=np.uint8), size, size)
            for i in range(n)]


def test_stage1_titok_records_unavailable_and_qa_off_does_nothing():
    cfg = titok_config("tiny_vq_single_stage")
    cfg["model"]["vq_model"].update(is_legacy=True, finetune_decoder=False)
    tok = build_tokenizer(cfg).eval()
    images = _images(3, tok.image_size)
    tokens = tok.encode_uint8(torch.from_numpy(np.concatenate([d.views for d in images]))).numpy()[:, None]
    qa = ShardQA(tok, every=1)
    qa.check(images, tokens)
    fields = qa.fields()
    assert fields["qa_psnr"] == [] and "stage-1 TiTok" in fields["qa_unavailable"]
    assert QASummary.of([_stats(**fields)]).describe().startswith("unavailable: this is a stage-1 TiTok")
    off = ShardQA(tok, every=0)
    off.check(images, tokens)
    assert off.fields()["qa_every"] == 0 and off.fields()["qa_psnr"] == [] and off.fields()["qa_unavailable"] is None


def test_flextok_qa_decodes_the_full_id_sequence(tmp_path):
    tok = load_tokenizer(str(write_flextok_checkpoint(tmp_path / "flextok")))
    images = _images(1, tok.image_size, seed=3)
    views = torch.from_numpy(np.concatenate([d.views for d in images]))
    ids = tok.encode_uint8(views)
    assert ids.shape[1] == tok.num_tokens
    qa = ShardQA(tok, every=1)
    qa.check(images, ids.numpy()[:, None])
    keys = [d.key for d in images]
    settings = TokenCountSettings(1.0, (tok.num_tokens,))  # the official 20 steps, guidance 7.5, APG
    noise = image_noise(keys, 0, noise_shape(tok, tok.image_size))
    mse = reconstruction_mse(tok, views.float() / 255, ids.long(), noise, settings)
    np.testing.assert_allclose(qa.fields()["qa_psnr"], (10 * torch.log10(1 / mse)).numpy(), atol=0.01)


def _stats(**qa) -> ShardStats:
    return ShardStats(0, "train-00000-of-00001", "x", None, 0, 0, **qa)
