"""Decoding: views, upright sizes, and a recorded reason for every image that cannot be used."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageFile

from pipeline import decode as decode_module
from pipeline.decode import decode_record
from pipeline.records import FORMATS, DecodedImage, Record, SkippedRecord
from pipeline.sources import iter_records, list_source
from pipeline.synthetic import BAD_KINDS, EXIF_ORIENTATION, render, write_synthetic
from tokenizer.transform import ImageTransform

T32 = ImageTransform(32)


def jpeg(img: Image.Image, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, **kwargs)
    return buf.getvalue()


def test_decodes_full_image_into_views_with_passthrough():
    data = jpeg(render(1, (80, 64), np.random.default_rng(0)))
    record = Record("k", data, label=1, caption="c", extra={"json": "{}"})
    out = decode_record(record, ImageTransform(32, "flip"))
    assert isinstance(out, DecodedImage)
    assert (out.key, out.width, out.height, out.label, out.caption, out.extra) == ("k", 80, 64, 1, "c", {"json": "{}"})
    assert out.views.shape == (2, 3, 32, 32) and out.views.dtype == np.uint8
    assert np.array_equal(out.views, ImageTransform(32, "flip")(Image.open(io.BytesIO(data))))  # no draft mode


def test_missing_empty_and_oversized_images_are_skipped():
    data = jpeg(render(0, (80, 64), np.random.default_rng(0)))
    assert decode_record(Record("a", None), T32) == SkippedRecord("a", "no image")
    assert decode_record(Record("b", b""), T32) == SkippedRecord("b", "empty image")
    assert decode_record(Record("c", data), T32, max_pixels=80 * 64 - 1) == SkippedRecord("c", "image too large: 80x64")
    assert isinstance(decode_record(Record("c", data), T32, max_pixels=80 * 64), DecodedImage)


def test_undecodable_reasons_are_short_and_reproducible():
    data = jpeg(render(0, (64, 64), np.random.default_rng(0)))
    garbage = decode_record(Record("g", b"GIF89a not really"), T32)
    truncated = decode_record(Record("t", data[: len(data) // 2]), T32)
    assert garbage.reason.startswith("undecodable image: ") and " at 0x" not in garbage.reason
    assert truncated.reason.startswith("undecodable image: OSError: image file is truncated")
    assert decode_record(Record("g", b"GIF89a not really"), T32) == garbage
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_exif_rotated_image_comes_out_upright():
    upright = render(2, (48, 80), np.random.default_rng(0))
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    out = decode_record(Record("r", jpeg(upright.transpose(Image.Transpose.ROTATE_90), exif=exif)), T32)
    assert (out.width, out.height) == (48, 80)
    diff = np.abs(out.views[0].astype(int) - T32(upright)[0].astype(int)).mean()
    assert diff < 8  # same picture up to JPEG loss; a sideways image would differ wholesale


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_bad_kind_is_skipped_or_converted(fmt, tmp_path):
    ds = write_synthetic(str(tmp_path), fmt, num_shards=2, images_per_shard=2, bad=True)
    expected_kinds = set(BAD_KINDS) - ({"no_image"} if fmt == "imagefolder" else set())
    assert ds.bad_counts == dict.fromkeys(expected_kinds, 1)
    listing = list_source(str(tmp_path), images_per_shard=2)
    outcomes = {r.key: decode_record(r, T32) for shard in listing.shards for r in iter_records(shard)}
    assert set(outcomes) == set(ds.keys)
    for key, out in outcomes.items():
        bad = ds.bad.get(key)
        if bad is not None and bad.reason is not None:
            assert isinstance(out, SkippedRecord) and out.reason.startswith(bad.reason), (bad, out)
            continue
        assert isinstance(out, DecodedImage), (bad, out)
        assert out.views.shape == (1, 3, 32, 32) and out.label == ds.labels[key]
        if bad is not None:
            assert (out.width, out.height) == bad.size, bad


def test_only_pillow_errors_are_skips_memory_and_other_errors_fail_the_attempt(monkeypatch):
    data = jpeg(render(0, (64, 48), np.random.default_rng(0)))
    truncated = decode_record(Record("t", data[:200]), T32)
    assert isinstance(truncated, SkippedRecord) and truncated.reason.startswith("undecodable image: ")
    for error in (MemoryError(), RuntimeError("a bug in the transform"), OSError(28, "No space left on device")):
        def broken(img, error=error):
            raise error
        monkeypatch.setattr(decode_module, "to_rgb", broken)
        with pytest.raises(type(error)):
            decode_record(Record("k", data), T32)


def test_only_allowed_formats_are_opened_and_reader_refusals_are_kept():
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (9, 99, 199)).save(buf, "PPM")  # Pillow reads PPM, but it is not allowed
    out = decode_record(Record("p", buf.getvalue()), T32)
    assert isinstance(out, SkippedRecord) and out.reason.startswith("undecodable image: UnidentifiedImageError")
    refused = Record("big", None, skip_reason="member too large: .jpg is 9 bytes (limit 8)")
    assert decode_record(refused, T32) == SkippedRecord("big", "member too large: .jpg is 9 bytes (limit 8)")
