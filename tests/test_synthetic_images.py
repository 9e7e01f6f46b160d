"""The demo's sample images: deterministic, varied within a class, separable between classes,
and readable by the pipeline's webdataset reader."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

from jobs.class_check import NearestCentroid
from pipeline.sources import iter_records, list_source
from pipeline.synthetic_images import CLASSES, SIZE, caption, sample_images, write_samples


def test_deterministic_for_a_seed():
    a, la = sample_images(8, seed=3)
    b, lb = sample_images(8, seed=3)
    c, _ = sample_images(8, seed=4)
    assert a.shape == (8, SIZE, SIZE, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and np.array_equal(la, lb) and not np.array_equal(a, c)
    assert la.tolist() == [0, 1, 2, 3, 0, 1, 2, 3]


def test_images_vary_within_a_class():
    images, labels = sample_images(40, seed=0)
    for c in range(len(CLASSES)):
        members = images[labels == c].astype(np.float32)
        # no two images of a class alike: position, shape, colour, texture and background differ
        diffs = [np.abs(members[i] - members[j]).mean() for i in range(len(members)) for j in range(i)]
        assert min(diffs) > 5, CLASSES[c].name


def test_a_colour_and_shape_classifier_separates_the_classes():
    train, train_labels = sample_images(200, seed=0)
    test, test_labels = sample_images(100, seed=1)
    assert NearestCentroid.fit(train, train_labels).accuracy(test, test_labels) >= 0.95


def test_written_shards_read_back_with_labels_and_captions(tmp_path):
    paths = write_samples(str(tmp_path), num_shards=2, images_per_shard=3, seed=5)
    assert [p.rsplit("/", 1)[1] for p in paths] == ["00000.tar", "00001.tar"]
    records = [r for shard in list_source(str(tmp_path)).shards for r in iter_records(shard)]
    expected, labels = sample_images(6, seed=5)
    assert [r.label for r in records] == labels.tolist()
    assert [r.caption for r in records] == [caption(int(c)) for c in labels]
    decoded = np.stack([np.asarray(Image.open(io.BytesIO(r.image)).convert("RGB")) for r in records])
    assert np.array_equal(decoded, expected)  # lossless PNG
