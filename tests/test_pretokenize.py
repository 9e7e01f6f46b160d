"""End to end on a real local Ray cluster with 2 fake GPUs: every source format, S3 in and out,
resume, interruption, bad inputs, refusals."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
import s3fs
from datasets import ClassLabel, List, Value, load_dataset

from jobs.pretokenize import main as pretokenize_main
from pipeline.distributor import PretokenizeConfig, run_pretokenize
from pipeline.ledger import ShardStats
from pipeline.manifest import ManifestMismatch
from pipeline.synthetic import write_synthetic
from tests.faults import expected_tokens
from tests.hub_cache import TOKEN_CANARY, use_hub_cache
from tests.laion_fixtures import COARSE_NAMES, write_imagenet_parquet, write_laion
from tests.titok_fixtures import write_titok_checkpoint
from tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster():
    ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return str(write_titok_checkpoint("tiny_vq_single_stage", tmp_path_factory.mktemp("tok")))


def config(inp, out, tok_dir, **kw) -> PretokenizeConfig:
    base = dict(actors=2, gpus_per_actor=1.0, cpus_per_actor=0.5, batch_size=4, progress=False, images_per_shard=6)
    return PretokenizeConfig(input=inp, output=out, tokenizer=tok_dir, **{**base, **kw})


def tokens_by_key(ds) -> dict[str, np.ndarray]:
    keys = ds["key"]
    assert len(keys) == len(set(keys)), "duplicate keys"
    toks = np.asarray(ds.with_format("numpy")["tokens"])
    return dict(zip(keys, toks))


def stats_of(out: str, split="train") -> list[ShardStats]:
    return [ShardStats.from_json(p.read_text()) for p in sorted(Path(out, "stats").glob(f"{split}-*.json"))]


@pytest.mark.parametrize("fmt", ["webdataset", "parquet", "imagefolder"])
def test_format_end_to_end(cluster, tok_dir, tmp_path, fmt):
    inp, out = str(tmp_path / "in"), str(tmp_path / "out")
    info = write_synthetic(inp, fmt, num_shards=3, images_per_shard=6, num_classes=3, seed=1)
    summary = run_pretokenize(config(inp, out, tok_dir, format=fmt, views="flip"))
    assert summary.ok and summary.shards_written == summary.shards_total == 3
    assert summary.rows_in == summary.rows_written == 18 and summary.rows_skipped == 0

    ds = load_dataset(out, split="train", cache_dir=str(tmp_path / "hf"))
    assert ds.num_rows == 18
    if fmt == "webdataset":  # .cls members carry ids only
        assert ds.features["label"].dtype == "int64"
    else:
        assert isinstance(ds.features["label"], ClassLabel) and ds.features["label"].names == list(info.label_names)
    assert dict(zip(ds["key"], ds["label"])) == info.labels
    assert ds.features["tokens"].length == 2 and ds.features["tokens"].feature.length == 8
    got, want = tokens_by_key(ds), expected_tokens(inp, tok_dir, "flip")
    assert got.keys() == want.keys()
    for k in want:
        assert np.array_equal(got[k].astype(np.int64), want[k]), k
    assert not any(Path(out, "_tmp").iterdir())
    gpus = {s.worker["pid"]: tuple(s.worker["gpu_ids"]) for s in stats_of(out)}
    assert all(len(g) == 1 for g in gpus.values()) and len(set(gpus.values())) == len(gpus), gpus  # one GPU each


def test_rerun_after_completion_writes_nothing(cluster, tok_dir, tmp_path):
    inp, out = str(tmp_path / "in"), str(tmp_path / "out")
    write_synthetic(inp, "webdataset", num_shards=2, images_per_shard=5, seed=2)
    assert run_pretokenize(config(inp, out, tok_dir)).shards_written == 2
    before = {p: p.stat().st_mtime_ns for p in Path(out).rglob("*.parquet")}
    again = run_pretokenize(config(inp, out, tok_dir))
    assert again.shards_written == 0 and again.shards_skipped_done == 2 and again.rows_written == 10
    assert {p: p.stat().st_mtime_ns for p in Path(out).rglob("*.parquet")} == before


def test_bad_images_are_skipped_or_converted(cluster, tok_dir, tmp_path):
    inp, out = str(tmp_path / "in"), str(tmp_path / "out")
    info = write_synthetic(inp, "webdataset", num_shards=2, images_per_shard=4, bad=True, seed=3)
    summary = run_pretokenize(config(inp, out, tok_dir))
    assert summary.ok
    skipped = {s["key"]: s["reason"] for st in stats_of(out) for s in st.skipped}
    assert summary.rows_in == summary.rows_written + len(skipped)
    expected_skips = {k: b.reason for k, b in info.bad.items() if b.reason}
    assert set(skipped) == set(expected_skips), (skipped, expected_skips)
    assert all(skipped[k].startswith(r) for k, r in expected_skips.items()), skipped
    ds = load_dataset(out, split="train", cache_dir=str(tmp_path / "hf"))
    written = set(ds["key"])
    assert {k for k, b in info.bad.items() if b.reason is None} <= written
    assert not written & set(skipped)


def test_s3_in_and_out(cluster, tok_dir, s3, tmp_path):
    bucket = s3.bucket()
    inp, out = f"s3://{bucket}/in", f"s3://{bucket}/out"
    write_synthetic(inp, "parquet", num_shards=2, images_per_shard=5, num_classes=3, seed=4, storage_options=s3.storage_options)
    summary = run_pretokenize(config(inp, out, tok_dir, storage_options=s3.storage_options))
    assert summary.ok and summary.rows_written == 10
    ds = load_dataset("parquet", data_files=f"{out}/data/train-*.parquet", storage_options=s3.storage_options,
                      split="train", cache_dir=str(tmp_path / "hf"))
    assert isinstance(ds.features["label"], ClassLabel) and ds.num_rows == 10
    fs = s3fs.S3FileSystem(**s3.storage_options)  # QA thumbnails and the run report go to S3 too
    assert fs.cat(f"{out}/stats/train-00000-of-00002.qa.png")[:4] == b"\x89PNG"
    assert fs.cat(f"{out}/report/train-qa-sheet.png")[:4] == b"\x89PNG" and summary.report == f"{out}/report/"
    assert json.loads(fs.cat(f"{out}/report/train-report.json"))["rows_written"] == 10
    got, want = tokens_by_key(ds), expected_tokens(inp, tok_dir, storage_options=s3.storage_options)
    assert all(np.array_equal(got[k].astype(np.int64), want[k]) for k in want) and got.keys() == want.keys()
    again = run_pretokenize(config(inp, out, tok_dir, storage_options=s3.storage_options))
    assert again.shards_written == 0


def test_driver_killed_then_rerun_matches_clean_run(cluster, tok_dir, tmp_path):
    inp, out, clean = str(tmp_path / "in"), str(tmp_path / "out"), str(tmp_path / "clean")
    write_synthetic(inp, "webdataset", num_shards=16, images_per_shard=24, seed=5, image_size=(320, 240))
    cmd = [sys.executable, "-m", "jobs.pretokenize", inp, out, "--tokenizer", tok_dir, "--actors", "1",
           "--cpus-per-actor", "0.5", "--batch-size", "2", "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "RAY_ADDRESS": cluster},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stats_dir, data_dir = Path(out, "stats"), Path(out, "data")
    deadline = time.time() + 120
    while time.time() < deadline and len(list(stats_dir.glob("*.json"))) < 2:
        for f in data_dir.glob("*"):  # whatever is listed is a complete Parquet file
            pq.ParquetFile(f).metadata
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_at_kill = len(list(stats_dir.glob("*.json")))
    assert 2 <= done_at_kill < 16, "the kill must land mid-run"
    for f in data_dir.glob("*"):
        pq.ParquetFile(f).metadata

    resumed = run_pretokenize(config(inp, out, tok_dir, actors=1))
    assert resumed.ok and resumed.shards_skipped_done >= 2 and resumed.shards_written == 16 - resumed.shards_skipped_done
    run_pretokenize(config(inp, clean, tok_dir, actors=1))
    a = load_dataset(out, split="train", cache_dir=str(tmp_path / "hf1"))
    b = load_dataset(clean, split="train", cache_dir=str(tmp_path / "hf2"))
    assert a.num_rows == b.num_rows == 16 * 24
    ta, tb = tokens_by_key(a), tokens_by_key(b)
    assert ta.keys() == tb.keys() and all(np.array_equal(ta[k], tb[k]) for k in ta)
    for i in range(16):  # byte-identical token columns shard by shard
        name = f"train-{i:05d}-of-00016.parquet"
        assert pq.read_table(Path(out, "data", name))["tokens"].equals(pq.read_table(Path(clean, "data", name))["tokens"])


def test_other_tokenizer_is_refused_unless_overwrite(cluster, tok_dir, tmp_path):
    inp, out = str(tmp_path / "in"), str(tmp_path / "out")
    write_synthetic(inp, "webdataset", num_shards=1, images_per_shard=3, seed=6)
    run_pretokenize(config(inp, out, tok_dir, actors=1))
    other = str(write_titok_checkpoint("tiny_vq_two_stage", tmp_path / "tok2"))
    with pytest.raises(ManifestMismatch, match="fingerprint differs"):
        run_pretokenize(config(inp, out, other, actors=1))
    with pytest.raises(ManifestMismatch, match="views"):
        run_pretokenize(config(inp, out, tok_dir, actors=1, views="flip"))
    assert run_pretokenize(config(inp, out, other, actors=1, overwrite=True)).shards_written == 1


def test_broken_shard_fails_after_one_try_others_complete(cluster, tok_dir, tmp_path):
    inp, out = tmp_path / "in", str(tmp_path / "out")
    write_synthetic(str(inp), "webdataset", num_shards=3, images_per_shard=4, seed=7)
    tars = sorted(inp.glob("*.tar"))
    good = tars[1].read_bytes()
    tars[1].write_bytes(good[: len(good) // 2])  # truncated mid-member
    summary = run_pretokenize(config(str(inp), out, tok_dir, max_retries=3))
    assert not summary.ok and [f["index"] for f in summary.shards_failed] == [1]
    (failure,) = summary.shards_failed  # a corrupt tar is not retried: no retry can read it
    assert failure["attempts"] == 1 and "BadShard" in failure["error"] and "unexpected end of data" in failure["error"]
    assert summary.shards_written == 2 and not Path(out, "data", "train-00001-of-00003.parquet").exists()
    tars[1].write_bytes(good)
    fixed = run_pretokenize(config(str(inp), out, tok_dir))
    assert fixed.ok and fixed.shards_written == 1 and fixed.shards_skipped_done == 2
    assert sorted(s.index for s in stats_of(out)) == [0, 1, 2]


def test_cpu_encoders_when_no_gpu_share_is_asked(cluster, tok_dir, tmp_path):
    inp, out = str(tmp_path / "in"), str(tmp_path / "out")
    write_synthetic(inp, "parquet", num_shards=1, images_per_shard=3, seed=8)
    assert run_pretokenize(config(inp, out, tok_dir, actors=1, gpus_per_actor=0.0)).ok
    (stats,) = stats_of(out)
    assert stats.worker["gpu_ids"] == [] and stats.worker["device"] == "cpu"


@ray.remote(num_cpus=0)
def _workers_hub_cache() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def test_tokenizer_by_hub_repo_id(cluster, tok_dir, tmp_path, monkeypatch, capfd):
    """The driver resolves the repo id once (offline, from its hub cache) and ships the checkpoint
    bytes through the object store: the worker processes cannot even see that cache. The hub token
    appears in no log and no output file."""
    hub = use_hub_cache(monkeypatch, tmp_path / "hub")
    monkeypatch.setenv("HF_TOKEN", TOKEN_CANARY)
    assert ray.get(_workers_hub_cache.remote(), timeout=120) != str(hub.root)
    commit = hub.add("pretok-test/titok-tiny", {n: Path(tok_dir, n).read_bytes() for n in ("config.json", "model.safetensors")})
    inp, out = str(tmp_path / "in"), str(tmp_path / "out")
    write_synthetic(inp, "webdataset", num_shards=2, images_per_shard=5, seed=9)
    summary = run_pretokenize(config(inp, out, "pretok-test/titok-tiny"))
    assert summary.ok and summary.shards_written == 2
    tok = json.loads(Path(out, "pretok.json").read_text())["tokenizer"]
    assert (tok["source"], tok["name"]) == (f"hf://pretok-test/titok-tiny@{commit}", "titok-tiny")
    assert tok["fingerprint"] == load_tokenizer(tok_dir).fingerprint
    got, want = tokens_by_key(load_dataset(out, split="train", cache_dir=str(tmp_path / "hf"))), expected_tokens(inp, tok_dir)
    assert got.keys() == want.keys() and all(np.array_equal(got[k].astype(np.int64), want[k]) for k in want)
    logs = capfd.readouterr()
    assert TOKEN_CANARY not in logs.out + logs.err
    assert not any(TOKEN_CANARY.encode() in p.read_bytes() for p in Path(out).rglob("*") if p.is_file())


LAION_KEEP = ("url,similarity,AESTHETIC_SCORE", "original_width,exif,key,width")
LAION_FEATURES = {
    "url": Value("string"), "similarity": Value("float64"), "AESTHETIC_SCORE": Value("float64"),
    "original_width": Value("int64"), "exif": Value("string"), "src_key": Value("string"), "src_width": Value("int64"),
}


def _laion_expected(sidecar) -> dict:
    """The kept values a sidecar must give: its typed values, null where a value does not fit."""
    if not isinstance(sidecar, dict):
        return dict.fromkeys(LAION_FEATURES)
    number = {k: float(v) if isinstance(v := sidecar.get(k), (int, float)) else None for k in ("similarity", "AESTHETIC_SCORE")}
    width = sidecar["original_width"]
    return {
        "url": sidecar["url"], **number, "original_width": width if isinstance(width, int) else None,
        "exif": json.dumps(sidecar["exif"], sort_keys=True) if "exif" in sidecar else None,
        "src_key": sidecar["key"], "src_width": sidecar["width"],
    }


def test_laion_kept_fields_round_trip_through_load_dataset(cluster, tok_dir, tmp_path):
    inp, out = tmp_path / "laion", str(tmp_path / "out")
    sidecars = write_laion(str(inp))
    summary = run_pretokenize(config(f"{inp}/{{00000..00001}}.tar", out, tok_dir, actors=1, keep=LAION_KEEP))
    assert summary.ok and summary.rows_written == 12

    ds = load_dataset(out, split="train", cache_dir=str(tmp_path / "hf"))
    assert {c: ds.features[c] for c in LAION_FEATURES} == LAION_FEATURES
    assert ds.column_names == ["key", "tokens", "caption", "width", "height", *LAION_FEATURES]
    rows = {r["key"]: {c: r[c] for c in LAION_FEATURES} for r in ds}
    assert rows == {k: _laion_expected(s) for k, s in sidecars.items()}
    assert rows["000100000"]["similarity"] is None and rows["000100001"]["original_width"] is None  # wrong types
    assert json.loads(rows["000100005"]["exif"]) == {"GPS": [1, 2], "Image Make": "Nikon"}

    pretty = ds.filter(lambda r: r["AESTHETIC_SCORE"] is not None and r["AESTHETIC_SCORE"] >= 6.5)
    assert sorted(pretty["key"]) == sorted(k for k, v in rows.items() if (v["AESTHETIC_SCORE"] or 0) >= 6.5)
    assert len(pretty) == 5

    first, later = (s.kept_nulls for s in stats_of(out))
    assert first == {"AESTHETIC_SCORE": {"missing": 1}, "exif": {"missing": 1}}
    broken = {"invalid_json": 1, "missing": 1}
    assert later == {c: {**broken, **({"wrong_type": 1} if c in ("similarity", "original_width") else {})}
                     for c in sorted(LAION_FEATURES)}
    manifest = json.loads(Path(out, "pretok.json").read_text())
    assert [(f["source"], f["column"], f["json_type"]) for f in manifest["kept"]][-2:] == [
        ("key", "src_key", "string"), ("width", "src_width", "int64")]
    with pytest.raises(ManifestMismatch, match="kept"):  # the kept fields are part of the fingerprint
        run_pretokenize(config(f"{inp}/{{00000..00001}}.tar", out, tok_dir, actors=1, keep=("url",)))


def test_parquet_extra_columns_round_trip(cluster, tok_dir, tmp_path):
    inp, out = str(tmp_path / "in"), str(tmp_path / "out")
    expected = write_imagenet_parquet(inp)
    summary = run_pretokenize(config(inp, out, tok_dir, actors=1, keep=("synset,coarse,bbox,score",)))
    assert summary.ok and summary.rows_written == 8
    ds = load_dataset(out, split="train", cache_dir=str(tmp_path / "hf"))
    assert ds.features["label"].names == ["tench", "goldfish", "shark"]
    assert (ds.features["coarse"], ds.features["bbox"], ds.features["score"], ds.features["synset"]) == (
        ClassLabel(names=COARSE_NAMES), List(Value("float32")), Value("float32"), Value("string"))
    assert "blob" not in ds.column_names
    got = {r["key"]: {c: r[c] for c in ("synset", "coarse", "bbox", "score")} for r in ds}
    assert got == expected
    assert [s.kept_nulls for s in stats_of(out)] == [{}, {"score": {"wrong_type": 4}, "synset": {"missing": 4}}]


def test_missing_shards_fail_first_or_are_recorded_and_filled_later(cluster, tok_dir, tmp_path, capsys):
    inp, out = tmp_path / "in", str(tmp_path / "out")
    write_synthetic(str(inp), "webdataset", num_shards=3, images_per_shard=3, seed=9)
    held = inp / "00001.tar"
    data = held.read_bytes()
    held.unlink()
    pattern = f"{inp}/{{00000..00002}}.tar"
    assert pretokenize_main([pattern, out, "--tokenizer", tok_dir, "--no-progress"]) == 2
    assert f"1 of 3 named shards do not exist: file://{held}; --allow-missing" in capsys.readouterr().err
    assert not Path(out).exists()

    summary = run_pretokenize(config(pattern, out, tok_dir, actors=1, allow_missing=True))
    assert summary.ok and (summary.shards_written, summary.shards_missing) == (2, 1)
    assert "missing  1 named input shards" in summary.describe()
    split = json.loads(Path(out, "pretok.json").read_text())["splits"]["train"]
    assert (split["missing"], split["num_shards"]) == ([f"file://{held}"], 3)
    written = {p: p.stat().st_mtime_ns for p in Path(out, "data").iterdir()}
    assert sorted(p.name for p in written) == ["train-00000-of-00003.parquet", "train-00002-of-00003.parquet"]

    held.write_bytes(data)  # the shard arrives: the same names, only it is written
    filled = run_pretokenize(config(pattern, out, tok_dir, actors=1))
    assert filled.ok and (filled.shards_written, filled.shards_skipped_done, filled.shards_missing) == (1, 2, 0)
    assert all(p.stat().st_mtime_ns == t for p, t in written.items())
    assert "missing" not in json.loads(Path(out, "pretok.json").read_text())["splits"]["train"]
    assert load_dataset(out, split="train", cache_dir=str(tmp_path / "hf")).num_rows == 9


def test_driver_log_follows_stderr_across_runs_in_one_process(monkeypatch):
    """A second in-process run logs to the stderr of its own time, even after the first run's
    stderr was closed (as pytest's capture, a notebook cell or a wrapper does)."""
    import io
    import logging

    from jobs.pretokenize import _log_to_stderr

    first, second = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    _log_to_stderr()
    logging.getLogger("pretok").warning("first run")
    first.close()
    monkeypatch.setattr(sys, "stderr", second)
    _log_to_stderr()
    logging.getLogger("pretok").warning("second run")
    assert "second run" in second.getvalue() and "Logging error" not in second.getvalue()
