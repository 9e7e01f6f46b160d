"""Token dataset loading: ``load_tokens`` (local and S3) and the shuffled ``TokenLoader``."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from datasets import ClassLabel, Features, List, Value
from torch.utils.data import DataLoader

from pipeline.tokens import StreamLoader, TokenFiles, TokenLoader, load_tokens

LABELS = ("cat", "dog", "eel")


@dataclass
class TokenData:
    """What ``write_token_dataset`` wrote: tokens uint16 [R,V,N] and labels in global row order."""

    out: str
    tokens: np.ndarray
    labels: np.ndarray


def write_token_dataset(
    out: str | Path,
    shard_rows: list[int],
    *,
    num_tokens: int = 8,
    num_views: int = 2,
    codebook_size: int = 4096,
    label_names: tuple[str, ...] | None = LABELS,
    ordered: bool = False,
    split: str = "train",
    seed: int = 0,
    row_group_size: int = 7,
    tokens: np.ndarray | None = None,
    fingerprint: str = "f" * 64,
) -> TokenData:
    """An output dataset in the pretok layout (pretok.json, data/*.parquet with HF + pretok schema
    metadata, README card); row r has label ``r % K``. By default token 0 of every view is the
    global row id and token 1 the view index, so tests can tell rows and views apart; ``tokens``
    (uint16 [R,V,N]) overrides."""
    out = str(out)
    total = sum(shard_rows)
    labels = np.arange(total) % (len(label_names) if label_names else 5)
    if tokens is None:
        tokens = np.random.default_rng(seed).integers(0, codebook_size, (total, num_views, num_tokens), np.uint16)
        tokens[:, :, 0] = np.arange(total)[:, None]
        tokens[:, :, 1] = np.arange(num_views)[None, :]
    manifest = {
        "format_version": 1,
        "tokenizer": {"family": "flextok" if ordered else "titok", "name": "test", "fingerprint": fingerprint,
                      "num_tokens": num_tokens, "codebook_size": codebook_size, "ordered": ordered,
                      "image_size": 32},
        "transform": {"resolution": 32, "views": {1: "center", 2: "flip", 10: "tencrop"}[num_views],
                      "num_views": num_views},
        "precision": "fp32",
        "label_names": list(label_names) if label_names else None,
    }
    features = Features({
        "key": Value("string"),
        "tokens": List(List(Value("uint16"), length=num_tokens), length=num_views),
        "label": ClassLabel(names=list(label_names)) if label_names else Value("int32"),
        "width": Value("int32"),
        "height": Value("int32"),
    })
    schema = pa.schema(
        [pa.field("key", pa.string(), nullable=False),
         pa.field("tokens", pa.list_(pa.list_(pa.uint16(), num_tokens), num_views), nullable=False),
         pa.field("label", pa.int32()),
         pa.field("width", pa.int32(), nullable=False),
         pa.field("height", pa.int32(), nullable=False)],
        metadata={"huggingface": json.dumps({"info": {"features": features.to_dict()}}),
                  "pretok": json.dumps(manifest, sort_keys=True)},
    )
    os.makedirs(f"{out}/data", exist_ok=True)
    os.makedirs(f"{out}/stats", exist_ok=True)
    with open(f"{out}/pretok.json", "w") as f:
        json.dump(manifest, f)
    start = 0
    for i, n in enumerate(shard_rows):
        rows = slice(start, start + n)
        inner = pa.FixedSizeListArray.from_arrays(pa.array(tokens[rows].reshape(-1), pa.uint16()), num_tokens)
        table = pa.table(
            [pa.array([f"img{r:06d}" for r in range(start, start + n)], pa.string()),
             pa.FixedSizeListArray.from_arrays(inner, num_views),
             pa.array(labels[rows], pa.int32()),
             pa.array(np.full(n, 40), pa.int32()),
             pa.array(np.full(n, 30), pa.int32())],
            schema=schema,
        )
        name = f"{split}-{i:05d}-of-{len(shard_rows):05d}"
        pq.write_table(table, f"{out}/data/{name}.parquet", compression="zstd", use_dictionary=True,
                       row_group_size=row_group_size)
        with open(f"{out}/stats/{name}.json", "w") as f:
            json.dump({"rows_written": n}, f)
        start += n
    with open(f"{out}/README.md", "w") as f:
        f.write(f"---\nconfigs:\n- config_name: default\n  data_files:\n  - split: {split}\n"
                f"    path: data/{split}-*.parquet\n---\n")
    return TokenData(out, tokens, labels)


@pytest.fixture
def data(tmp_path) -> TokenData:
    return write_token_dataset(tmp_path / "out", [23, 0, 17, 30, 11])


def epoch_rows(batches) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row ids, view ids, labels) over an epoch's batches, checking dtypes and shapes."""
    rows, views, labels = [], [], []
    for tokens, lab in batches:
        assert tokens.dtype == torch.int64 and lab.dtype == torch.int64
        assert tokens.ndim == 2 and lab.shape == tokens.shape[:1]
        rows.append(tokens[:, 0].numpy())
        views.append(tokens[:, 1].numpy())
        labels.append(lab.numpy())
    return np.concatenate(rows), np.concatenate(views), np.concatenate(labels)


def check_exactly_once(data: TokenData, rows: np.ndarray, labels: np.ndarray) -> None:
    assert sorted(rows.tolist()) == list(range(len(data.labels)))
    np.testing.assert_array_equal(labels, data.labels[rows])


# ---------------------------------------------------------------------------------- load_tokens


def test_load_tokens_restores_features(data, tmp_path):
    ds = load_tokens(data.out, cache_dir=str(tmp_path / "cache"))
    assert ds.features["label"] == ClassLabel(names=list(LABELS))
    assert ds.features["tokens"] == List(List(Value("uint16"), length=8), length=2)
    assert len(ds) == len(data.labels)
    arr = ds.with_format("numpy")[:]
    order = np.argsort(arr["key"])
    np.testing.assert_array_equal(arr["tokens"][order], data.tokens)
    np.testing.assert_array_equal(arr["label"][order], data.labels)


def test_load_tokens_max_tokens(tmp_path):
    flex = write_token_dataset(tmp_path / "flex", [9, 5], num_tokens=6, ordered=True)
    ds = load_tokens(flex.out, max_tokens=3, cache_dir=str(tmp_path / "cache"))
    assert ds.features["tokens"] == List(List(Value("uint16"), length=3), length=2)
    assert ds.features["label"].names == list(LABELS)
    arr = ds.with_format("numpy")[:]
    np.testing.assert_array_equal(arr["tokens"][np.argsort(arr["key"])], flex.tokens[:, :, :3])
    with pytest.raises(ValueError, match=r"\[1, 6\]"):
        load_tokens(flex.out, max_tokens=7)


def test_load_tokens_refuses_prefix_of_unordered_tokens(data):
    with pytest.raises(ValueError, match="not ordered"):
        load_tokens(data.out, max_tokens=4)


def test_load_tokens_errors(tmp_path, data):
    with pytest.raises(FileNotFoundError, match="pretok.json"):
        load_tokens(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="validation"):
        load_tokens(data.out, split="validation")


def test_incomplete_dataset_warns(data):
    os.remove(f"{data.out}/data/train-00003-of-00005.parquet")
    with pytest.warns(UserWarning, match="4 of 5 shards"):
        TokenFiles.open(data.out)


def upload(local: str, url: str, storage_options: dict | None = None) -> None:
    import fsspec

    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    fs.put(local + "/", path + "/", recursive=True)


def test_load_tokens_from_s3(s3_server, s3_bucket, data, tmp_path):
    """Explicit storage options (endpoint + keys), as a job would pass with --storage-options."""
    storage_options = s3_server.storage_options
    url = f"{s3_bucket}/imagenet"
    upload(data.out, url, storage_options)
    ds = load_tokens(url, storage_options=storage_options, cache_dir=str(tmp_path / "cache"))
    assert ds.features["label"].names == list(LABELS)
    arr = ds.with_format("numpy")[:]
    np.testing.assert_array_equal(arr["tokens"][np.argsort(arr["key"])], data.tokens)

    loader = TokenLoader(TokenFiles.open(url, storage_options=storage_options), batch_size=16)
    rows, _, labels = epoch_rows(loader)
    check_exactly_once(data, rows, labels)


def test_load_tokens_s3_offline_mode_is_explained(s3_bucket, data, tmp_path, monkeypatch):
    """Endpoint and keys from the AWS environment only; offline mode with an empty cache."""
    import datasets

    upload(data.out, f"{s3_bucket}/out")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(RuntimeError, match="offline mode"):
        load_tokens(f"{s3_bucket}/out", cache_dir=str(tmp_path / "empty-cache"))


# ---------------------------------------------------------------------------------- TokenLoader


def test_loader_single_process(data):
    loader = TokenLoader(TokenFiles.open(data.out), batch_size=8, seed=3)
    batches = list(loader)
    assert [len(b[1]) for b in batches] == [8] * 10 + [1]
    assert all(b[0].shape[1] == 8 for b in batches)
    rows, views, labels = epoch_rows(batches)
    check_exactly_once(data, rows, labels)
    assert set(views.tolist()) == {0, 1}


def test_loader_drop_last_and_buffered_reads(data):
    files = TokenFiles.open(data.out)
    batches = list(TokenLoader(files, batch_size=8, buffer_shards=2, drop_last=True))
    assert [len(b[1]) for b in batches] == [8] * 10
    rows, _, _ = epoch_rows(list(TokenLoader(files, batch_size=8, buffer_shards=1)))
    check_exactly_once(data, rows, data.labels[rows])


def test_loader_dataloader_workers(data):
    loader = TokenLoader(TokenFiles.open(data.out), batch_size=6, seed=1)
    loader.set_epoch(2)
    rows, _, labels = epoch_rows(DataLoader(loader, batch_size=None, num_workers=2))
    check_exactly_once(data, rows, labels)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_ranks_partition_the_epoch(data, num_workers):
    """2 ranks x workers: disjoint, together every row once; 5 shards do not divide evenly."""
    files = TokenFiles.open(data.out)
    per_rank = []
    for rank in range(2):
        loader = TokenLoader(files, batch_size=5, seed=7, rank=rank, world_size=2)
        loader.set_epoch(1)
        per_rank.append(epoch_rows(DataLoader(loader, batch_size=None, num_workers=num_workers)))
    assert not set(per_rank[0][0]) & set(per_rank[1][0])
    rows = np.concatenate([r[0] for r in per_rank])
    check_exactly_once(data, rows, np.concatenate([r[2] for r in per_rank]))


def test_loader_shuffle_per_epoch_and_seed(data):
    files = TokenFiles.open(data.out)

    def run(seed: int, epoch: int):
        loader = TokenLoader(files, batch_size=8, seed=seed)
        loader.set_epoch(epoch)
        return epoch_rows(loader)

    r0, v0, _ = run(seed=5, epoch=0)
    again, v_again, _ = run(seed=5, epoch=0)
    np.testing.assert_array_equal(r0, again)
    np.testing.assert_array_equal(v0, v_again)
    r1, v1, _ = run(seed=5, epoch=1)
    assert not np.array_equal(r0, r1)
    assert not np.array_equal(run(seed=6, epoch=0)[0], r0)
    # one random view per sample per epoch: for a given row the view changes across epochs
    view0, view1 = np.empty(len(r0), int), np.empty(len(r1), int)
    view0[r0], view1[r1] = v0, v1
    assert 0.3 < (view0 != view1).mean() < 0.7


def test_loader_max_tokens(tmp_path):
    flex = write_token_dataset(tmp_path / "flex", [10, 10], num_tokens=6, ordered=True)
    files = TokenFiles.open(flex.out)
    tokens, _ = next(iter(TokenLoader(files, batch_size=4, max_tokens=2)))
    assert tokens.shape == (4, 2)
    with pytest.raises(ValueError, match="not ordered"):
        TokenLoader(TokenFiles.open(write_token_dataset(tmp_path / "titok", [4]).out), 4, max_tokens=2)


def test_loader_argument_checks(data, tmp_path):
    files = TokenFiles.open(data.out)
    with pytest.raises(ValueError, match="5 shards cannot feed 6 ranks"):
        TokenLoader(files, 4, rank=0, world_size=6)
    with pytest.raises(ValueError, match="rank"):
        TokenLoader(files, 4, rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        TokenLoader(files, 0)


# ---------------------------------------------------------------------------------- StreamLoader


def global_batches(data: TokenData, world: int, num_workers: int = 0, epoch: int = 0, skip: int = 0, **kw):
    """Row ids of each global batch of an epoch, joined over ``world`` ranks (rank order)."""
    files = TokenFiles.open(data.out)
    per_rank = []
    for rank in range(world):
        loader = StreamLoader(files, 12, 6, seed=5, rank=rank, world_size=world, **kw)
        loader.set_epoch(epoch, skip)
        items = list(DataLoader(loader, batch_size=None, num_workers=num_workers)) if num_workers else list(loader)
        parts = max(1, num_workers)  # a DataLoader yields each step's parts one per worker, in worker order
        per_rank.append([np.concatenate([t[:, 0].numpy() for t, _ in items[i : i + parts]])
                         for i in range(0, len(items), parts)])
        assert all(len(b) == 12 // world for b in per_rank[-1])
    return [np.concatenate(step) for step in zip(*per_rank)]


def test_stream_loader_global_batches_do_not_depend_on_world_size(data):
    one = global_batches(data, 1)
    assert len(one) == 6  # 81 rows // 6 streams = 13 rows a stream, 2 per step: 6 steps
    rows = np.concatenate(one)
    assert len(set(rows.tolist())) == len(rows) == 72  # no row twice in an epoch
    def same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
        return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))

    for world, workers in ((2, 0), (3, 0), (6, 0), (2, 2), (1, 2)):
        assert same(global_batches(data, world, workers), one), (world, workers)
    assert same(global_batches(data, 2, skip=4), one[4:])  # a resume's partial epoch
    assert not same(global_batches(data, 1, epoch=1), one)  # reshuffled per epoch


def test_stream_loader_labels_views_and_buffers(data):
    files = TokenFiles.open(data.out)
    loader = StreamLoader(files, 12, 6, seed=0, buffer_shards=1)
    for tokens, labels in loader:
        assert tokens.dtype == torch.int64 and tokens.shape == (12, 8)
        rows = tokens[:, 0].numpy()
        np.testing.assert_array_equal(labels.numpy(), data.labels[rows])
        assert set(tokens[:, 1].tolist()) <= {0, 1}  # one of the two views


def test_stream_loader_argument_checks(data):
    files = TokenFiles.open(data.out)
    with pytest.raises(ValueError, match="multiple of the data streams"):
        StreamLoader(files, 10, 4)
    with pytest.raises(ValueError, match="cannot share 6 data streams"):
        StreamLoader(files, 12, 6, rank=0, world_size=4)
    with pytest.raises(ValueError, match="make no global batch"):
        StreamLoader(files, 96, 6)
