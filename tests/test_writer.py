"""Writer, ledger, manifest and card: the output contract without Ray or a source."""
from __future__ import annotations

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from datasets import ClassLabel, load_dataset

from pipeline.card import write_card
from pipeline.layout import OutputLayout
from pipeline.ledger import Ledger, ShardStats, redact_url
from pipeline.manifest import ManifestMismatch, prepare_output, run_fingerprint
from pipeline.records import DecodedImage
from pipeline.schema import TokenSchema
from pipeline.writer import ShardWriter

N, V, NAMES = 8, 2, ("cat", "dog", "eel")


def manifest(fp="tok-a", shard_hash="h1"):
    return {
        "format_version": 1,
        "tokenizer": {"family": "titok", "name": "tiny", "fingerprint": fp, "num_tokens": N,
                      "codebook_size": 64, "ordered": False, "image_size": 32},
        "transform": {"resolution": 32, "views": "flip", "num_views": V, "resize": "r", "crop": "center"},
        "precision": "fp32",
        "label_names": list(NAMES),
        "splits": {"train": {"input": "in", "format": "parquet", "num_shards": 2, "shard_list_sha256": shard_hash}},
        "software": {},
    }


def rows(n, start=0):
    return [DecodedImage(key=f"k{start + i}", views=None, width=10 + i, height=20, label=i % 3, caption=f"c{i}")
            for i in range(n)]


def write_shard(layout, index, man, n, seed=0):
    schema = TokenSchema(N, V, True, NAMES, True)
    w = ShardWriter(layout, index, schema, man)
    toks = np.random.default_rng(seed).integers(0, 64, (n, V, N), dtype=np.uint16)
    w.write(rows(n, 100 * index), toks)
    stats = ShardStats(index, layout.shard_name(index), "in", None, n + 1, n,
                       [{"key": "bad", "reason": "empty image"}], run_fingerprint=run_fingerprint(man, "train"))
    return w.commit(stats), toks


def test_roundtrip_load_dataset_restores_features(tmp_path):
    out = str(tmp_path / "out")
    layout = OutputLayout(out, "train", 2)
    man = prepare_output(layout, manifest(), overwrite=False)
    (s0, t0), (s1, t1) = write_shard(layout, 0, man, 5), write_shard(layout, 1, man, 3, seed=1)
    write_card(layout, man, {0: s0, 1: s1})
    ds = load_dataset(out, split="train", cache_dir=str(tmp_path / "hf-cache"))
    assert ds.num_rows == 8
    assert isinstance(ds.features["label"], ClassLabel) and ds.features["label"].names == list(NAMES)
    assert ds.features["tokens"].feature.feature.dtype == "uint16"
    got = np.asarray(ds.with_format("numpy")["tokens"])
    assert got.shape == (8, V, N) and np.array_equal(got, np.concatenate([t0, t1]))
    assert ds[0]["caption"] == "c0" and ds[0]["width"] == 10
    meta = pq.read_schema(layout.data_path(0)).metadata
    assert json.loads(meta[b"pretok"])["tokenizer"]["fingerprint"] == "tok-a"


def test_commit_is_atomic_and_stats_come_last(tmp_path):
    layout = OutputLayout(str(tmp_path), "train", 2)
    man = prepare_output(layout, manifest(), overwrite=False)
    w = ShardWriter(layout, 0, TokenSchema(N, V, True, NAMES, True), man)
    w.write(rows(4), np.zeros((4, V, N), np.uint16))
    assert not os.path.exists(layout.data_path(0)) and not os.path.exists(layout.stats_path(0))
    assert os.listdir(tmp_path / "_tmp")  # staged outside data/
    w.abort()
    assert not os.listdir(tmp_path / "_tmp") and not os.path.exists(tmp_path / "data")


def test_ledger_only_counts_agreeing_shards(tmp_path):
    layout = OutputLayout(str(tmp_path), "train", 2)
    man = prepare_output(layout, manifest(), overwrite=False)
    fp = run_fingerprint(man, "train")
    write_shard(layout, 0, man, 5)
    write_shard(layout, 1, man, 3)
    assert sorted(Ledger.read(layout, fp).done) == [0, 1]
    assert Ledger.read(layout, "other-run").done == {}
    with open(layout.data_path(1), "ab") as f:  # data no longer matches its stats
        f.write(b"x")
    assert sorted(Ledger.read(layout, fp).done) == [0]
    os.unlink(layout.stats_path(0))  # data without stats: not done
    assert Ledger.read(layout, fp).done == {}


def test_stats_must_reconcile():
    with pytest.raises(ValueError, match="rows in 3 != written 1 \\+ skipped 1"):
        ShardStats(0, "s", "in", None, 3, 1, [{"key": "a", "reason": "r"}])


def test_manifest_refuses_other_tokenizer_unless_overwrite(tmp_path):
    layout = OutputLayout(str(tmp_path), "train", 2)
    man = prepare_output(layout, manifest(), overwrite=False)
    write_shard(layout, 0, man, 2)
    with pytest.raises(ManifestMismatch, match="fingerprint differs"):
        prepare_output(layout, manifest(fp="tok-b"), overwrite=False)
    with pytest.raises(ManifestMismatch, match="split 'train' input"):
        prepare_output(layout, manifest(shard_hash="h2"), overwrite=False)
    prepare_output(layout, manifest(fp="tok-b"), overwrite=True)
    assert not os.path.exists(layout.data_path(0)) and not os.path.exists(layout.stats_path(0))
    assert json.loads(open(layout.manifest_path).read())["tokenizer"]["fingerprint"] == "tok-b"


def test_second_split_merges_into_manifest(tmp_path):
    layout = OutputLayout(str(tmp_path), "train", 2)
    prepare_output(layout, manifest(), overwrite=False)
    val = manifest()
    val["splits"] = {"validation": {**val["splits"]["train"], "shard_list_sha256": "v"}}
    merged = prepare_output(OutputLayout(str(tmp_path), "validation", 1), val, overwrite=False)
    assert sorted(merged["splits"]) == ["train", "validation"]


def test_redact_url():
    assert redact_url("s3://AKIA:secret@bucket/x") == "s3://bucket/x"
    assert redact_url("https://u:p@host/a@b") == "https://host/a@b"
    assert redact_url("/local/path") == "/local/path"


def test_split_names_follow_datasets_rules():
    OutputLayout("/o", "train.clean_2", 1)
    with pytest.raises(ValueError, match="split must be letters, digits and _"):
        OutputLayout("/o", "val-1", 1)  # load_dataset refuses "-" in split names
    layout = OutputLayout("/o", "train", 3)
    assert layout.owns("train-00001-of-00003.parquet") and layout.staged_tag("train-00001-of-00003.r1.x.parquet") == "r1"
    assert not layout.owns("train_extra-00001-of-00003.parquet") and not layout.owns("validation-00001-of-00003.json")


def test_next_run_aborts_its_splits_incomplete_uploads_and_the_infra_rule_is_valid(s3, s3_bucket):
    import re
    from pathlib import Path

    import boto3

    from pipeline.staging import clean_split_staging

    client = boto3.client("s3", endpoint_url=s3.endpoint_url)
    bucket = s3_bucket[len("s3://"):]
    for key in ("out/data/train-00000-of-00002.parquet", "out/data/validation-00000-of-00001.parquet"):
        client.create_multipart_upload(Bucket=bucket, Key=key)  # as an actor killed mid-upload leaves it
    assert clean_split_staging(OutputLayout(f"{s3_bucket}/out", "train", 2)) == 1
    assert [u["Key"] for u in client.list_multipart_uploads(Bucket=bucket)["Uploads"]] == [
        "out/data/validation-00000-of-00001.parquet"]
    readme = (Path(__file__).resolve().parents[1] / "infra" / "README.md").read_text()
    section = readme[readme.index("### S3: abort incomplete multipart uploads"):]
    rule = json.loads(re.search(r"```json\n(.*?)```", section, re.S).group(1))
    client.put_bucket_lifecycle_configuration(Bucket=bucket, LifecycleConfiguration=rule)
    (got,) = client.get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"]
    assert got["Status"] == "Enabled" and got["AbortIncompleteMultipartUpload"] == {"DaysAfterInitiation": 2}
