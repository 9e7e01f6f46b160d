"""Synthetic datasets: layouts, Hugging Face metadata, determinism and learnable classes."""
from __future__ import annotations

import io
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.records import FORMATS
from pipeline.synthetic import ROW_GROUP_ROWS, render, write_synthetic


def tree(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("fmt", FORMATS)
def test_deterministic_for_a_seed(fmt, tmp_path):
    a, b, c = (write_synthetic(str(tmp_path / name), fmt, images_per_shard=3, seed=seed)
               for name, seed in [("a", 0), ("b", 0), ("c", 1)])
    assert tree(tmp_path / "a") == tree(tmp_path / "b")
    assert tree(tmp_path / "a") != tree(tmp_path / "c")
    assert (a.shard_keys, a.labels) == (b.shard_keys, b.labels) == (c.shard_keys, c.labels)


def test_webdataset_layout_is_img2dataset_like(tmp_path):
    ds = write_synthetic(str(tmp_path), "webdataset", num_shards=2, images_per_shard=2, image_size=(40, 30))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000.tar", "00001.tar"]
    with tarfile.open(tmp_path / "00001.tar") as tar:
        names = tar.getnames()
        image = Image.open(io.BytesIO(tar.extractfile(names[0]).read()))
    key = ds.shard_keys[1][0]
    assert names[:4] == [f"{key}.jpg", f"{key}.txt", f"{key}.json", f"{key}.cls"]
    assert (image.format, image.size) == ("JPEG", (40, 30))


def test_parquet_carries_hf_imagenet_schema_and_classlabel_names(tmp_path):
    from datasets import ClassLabel, Features

    ds = write_synthetic(str(tmp_path), "parquet", num_shards=1, images_per_shard=40, num_classes=5)
    pf = pq.ParquetFile(tmp_path / "train-00000-of-00001.parquet")
    schema = pf.schema_arrow
    assert schema.field("image").type == pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    assert schema.field("label").type == pa.int64() and schema.field("caption").type == pa.string()
    assert pf.metadata.num_row_groups == -(-40 // ROW_GROUP_ROWS)
    features = Features.from_arrow_schema(schema)
    assert features["label"] == ClassLabel(names=list(ds.label_names))
    assert type(features["image"]).__name__ == "Image"


def test_imagefolder_has_class_subfolders(tmp_path):
    ds = write_synthetic(str(tmp_path), "imagefolder", num_shards=1, images_per_shard=8, num_classes=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == list(ds.label_names)
    assert ds.captions == {} and all(ds.labels[k] == ds.label_names.index(k.split("/")[0]) for k in ds.labels)


def test_classes_are_learnable_by_a_nearest_centroid_classifier():
    rng = np.random.default_rng(0)
    num_classes, per_class = 8, 12

    def features(label: int) -> np.ndarray:
        """Mean colour and area of the bright foreground (backgrounds are dark)."""
        pixels = np.asarray(render(label, (64, 48), rng), np.float32).reshape(-1, 3)
        foreground = pixels[pixels.max(1) > 150]
        return np.append(foreground.mean(0) / 255, len(foreground) / len(pixels))

    data = np.stack([[features(c) for _ in range(per_class)] for c in range(num_classes)])
    centroids = data[:, : per_class // 2].mean(1)
    test = data[:, per_class // 2:].reshape(-1, data.shape[-1])
    predicted = np.argmin(((test[:, None] - centroids[None]) ** 2).sum(-1), 1)
    truth = np.repeat(np.arange(num_classes), per_class - per_class // 2)
    assert (predicted == truth).mean() >= 0.9
