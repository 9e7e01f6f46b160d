"""Shard listing and streaming readers, locally and on a real (moto) S3 server."""
from __future__ import annotations

import io
import json
import os
import re
import socket
import tarfile
import traceback

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.local import LocalFileOpener, LocalFileSystem

from pipeline.records import FORMATS, InputShard
from pipeline.sources import BadShard, SourceError, iter_records, list_source
from pipeline.sources.storage import redact
from pipeline.synthetic import write_synthetic


def read_all(listing, storage_options=None):
    return [list(iter_records(shard, storage_options)) for shard in listing.shards]


@pytest.fixture(params=["local", "s3"])
def location(request, tmp_path) -> tuple[str, dict | None]:
    """(dataset URL, storage_options): a local folder, or a fresh S3 bucket with explicit options."""
    if request.param == "local":
        return str(tmp_path / "data"), None
    server = request.getfixturevalue("s3_server")
    return request.getfixturevalue("s3_bucket") + "/data", server.storage_options


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_lists_and_reads_end_to_end(fmt, location):
    url, options = location
    ds = write_synthetic(url, fmt, num_shards=2, images_per_shard=5, storage_options=options)
    listing = list_source(url, storage_options=options, images_per_shard=5)
    assert (listing.url, listing.format, listing.has_labels) == (url, fmt, True)
    assert listing.has_captions == (fmt != "imagefolder")
    assert listing.label_names == (None if fmt == "webdataset" else ds.label_names)
    assert [s.index for s in listing.shards] == list(range(len(ds.shard_keys)))
    assert all(s.format == fmt and s.size > 0 for s in listing.shards)

    shards = read_all(listing, options)
    assert tuple(tuple(r.key for r in records) for records in shards) == ds.shard_keys
    records = [r for rs in shards for r in rs]
    assert {r.key: r.label for r in records} == ds.labels
    assert {r.key: r.caption for r in records if r.caption is not None} == ds.captions
    assert all(r.image.startswith(b"\xff\xd8") for r in records)  # JPEG bytes as stored
    if fmt == "webdataset":
        assert all(json.loads(r.extra["json"])["key"] == r.key for r in records)


def test_s3_configuration_from_environment_alone(s3_bucket):
    ds = write_synthetic(s3_bucket, "webdataset", num_shards=2, images_per_shard=3)
    listing = list_source(s3_bucket)
    assert [s.url for s in listing.shards] == [f"{s3_bucket}/00000.tar", f"{s3_bucket}/00001.tar"]
    assert [[r.key for r in rs] for rs in read_all(listing)] == [list(k) for k in ds.shard_keys]


@pytest.mark.parametrize("fmt", ["webdataset", "parquet"])
def test_file_shards_sorted_with_sizes(fmt, tmp_path):
    write_synthetic(str(tmp_path), fmt, num_shards=3, images_per_shard=2)
    listing = list_source(str(tmp_path))
    paths = sorted(str(p) for p in tmp_path.iterdir())
    assert [s.url for s in listing.shards] == [f"file://{p}" for p in paths]
    assert [s.size for s in listing.shards] == [os.path.getsize(p) for p in paths]


def test_imagefolder_chunking_is_deterministic(tmp_path):
    ds = write_synthetic(str(tmp_path), "imagefolder", num_shards=3, images_per_shard=4, num_classes=3)
    listing = list_source(str(tmp_path), images_per_shard=5)
    assert listing == list_source(str(tmp_path), images_per_shard=5)
    assert [len(s.members) for s in listing.shards] == [5, 5, 2]
    assert [m for s in listing.shards for m in s.members] == sorted(ds.labels)
    assert {s.url for s in listing.shards} == {f"file://{tmp_path}"}
    for shard in listing.shards:
        assert shard.size == sum(os.path.getsize(tmp_path / m) for m in shard.members)
    assert listing.label_names == ds.label_names


def test_imagefolder_top_level_images_have_no_labels_and_mixed_layout_fails(tmp_path):
    write_synthetic(str(tmp_path / "src"), "imagefolder", num_shards=1, images_per_shard=3)
    flat = tmp_path / "flat"
    flat.mkdir()
    for i, path in enumerate(sorted((tmp_path / "src").rglob("*.jpg"))):
        (flat / f"{i}.jpg").write_bytes(path.read_bytes())
    listing = list_source(str(flat))
    assert (listing.has_labels, listing.label_names) == (False, None)
    assert [r.label for r in read_all(listing)[0]] == [None, None, None]
    (flat / "cls").mkdir()
    (flat / "cls" / "x.jpg").write_bytes((flat / "0.jpg").read_bytes())
    with pytest.raises(SourceError, match="mixes top-level images"):
        list_source(str(flat))


def test_single_file_and_glob_inputs(tmp_path):
    pq_dir, img_dir = tmp_path / "pq", tmp_path / "img"
    parquet = write_synthetic(str(pq_dir), "parquet", num_shards=3, images_per_shard=2)
    ds = write_synthetic(str(img_dir), "imagefolder", num_shards=1, images_per_shard=6, num_classes=3)

    one = list_source(str(pq_dir / "train-00001-of-00003.parquet"))
    assert [(s.index, s.url) for s in one.shards] == [(0, f"file://{pq_dir}/train-00001-of-00003.parquet")]
    assert one.label_names == parquet.label_names
    assert len(list_source(f"{pq_dir}/train-0000[02]-*.parquet").shards) == 2

    globbed = list_source(f"file://{img_dir}/00[02]_*/*.jpg")
    members = globbed.shards[0].members
    assert members == tuple(sorted(k for k in ds.labels if not k.startswith("001")))
    assert globbed.label_names == ds.label_names  # ids stay those of the whole folder
    assert {r.key: r.label for r in read_all(globbed)[0]} == {k: ds.labels[k] for k in members}

    single = list_source(str(img_dir / members[0]))
    assert (single.shards[0].members, single.has_labels) == ((members[0].split("/")[1],), False)


def test_format_mismatch_and_bad_format(tmp_path):
    url = str(tmp_path / "wds")
    write_synthetic(url, "webdataset", num_shards=2, images_per_shard=1)
    with pytest.raises(SourceError, match=rf"cannot list {re.escape(url)}: format 'parquet' .* found 2 webdataset"):
        list_source(url, format="parquet")
    with pytest.raises(SourceError, match="format must be auto or one of"):
        list_source(url, format="tfrecord")


def test_missing_and_empty_inputs(tmp_path, s3_bucket):
    with pytest.raises(SourceError, match=f"cannot list {tmp_path}/nope: not found"):
        list_source(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hi")
    with pytest.raises(SourceError, match="no .tar, .parquet or image files among 1 files"):
        list_source(str(tmp_path / "empty"))
    with pytest.raises(SourceError, match=f"cannot list {s3_bucket}/nothing: not found"):
        list_source(f"{s3_bucket}/nothing")


def test_unreachable_storage_fails_clearly_without_leaking_secrets():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed once the block ends
    secret = "wJalrXUtnFEMI-DO-NOT-LEAK"
    options = {
        "endpoint_url": f"http://127.0.0.1:{port}",
        "key": "AKIA-TEST-KEY-ID",
        "secret": secret,
        "config_kwargs": {"connect_timeout": 1, "retries": {"max_attempts": 1}},
    }
    with pytest.raises(SourceError) as listing_error:
        list_source("s3://somebucket/data", storage_options=options)
    shard = InputShard(index=0, url="s3://somebucket/data/00000.tar", format="webdataset")
    with pytest.raises(SourceError) as reading_error:
        next(iter_records(shard, options))
    assert not isinstance(reading_error.value, BadShard), "an unreachable store may work on a retry"
    for error, url in ((listing_error.value, "s3://somebucket/data"), (reading_error.value, shard.url)):
        text = "".join(traceback.format_exception(error))
        assert url in str(error) and "Could not connect" in str(error)
        assert secret not in text and "AKIA-TEST-KEY-ID" not in text


def test_redact_removes_url_user_info_and_option_secrets():
    text = "https://user:pw@host/x failed with token abcd1234 for s3cr3t"
    options = {"secret": "s3cr3t", "client_kwargs": {"aws_session_token": "abcd1234"}, "endpoint_url": "http://e"}
    assert redact(text, options) == "https://host/x failed with token *** for ***"


def write_tar(path, members: list[tuple[str, bytes | None]]) -> None:
    """Members in order; ``None`` data makes a directory entry."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_webdataset_grouping_and_key_normalisation(tmp_path):
    write_tar(tmp_path / "a.tar", [
        ("./dir", None),
        ("./dir/x.jpg", b"X"), ("./dir/x.txt", b"cap x"), ("./dir/x.cls", b" 3\n"), ("./dir/x.npy", b"?"),
        ("/abs/y.JPEG", b"Y"), ("/abs/y.json", b'{"k": 1}'),
        ("../up/z.seg.png", b"S"), ("../up/z.png", b"Z"), ("../up/z.webp", b"W"),
        ("noimage.txt", b"only text"),
    ])
    listing = list_source(str(tmp_path))
    assert (listing.format, listing.has_labels, listing.has_captions) == ("webdataset", True, True)
    records = read_all(listing)[0]
    assert [(r.key, r.image, r.label, r.caption, r.extra) for r in records] == [
        ("dir/x", b"X", 3, "cap x", {}),
        ("abs/y", b"Y", None, None, {"json": '{"k": 1}'}),
        ("../up/z", b"Z", None, None, {}),
        ("noimage", None, None, "only text", {}),
    ]
    write_tar(tmp_path / "a.tar", [("k.jpg", b"X"), ("k.cls", b"cat")])
    with pytest.raises(SourceError, match=r"\.cls is not an integer"):
        read_all(listing)


@pytest.mark.parametrize(("cut", "complete"), [("mid_data", 3), ("member_boundary", 2), ("mid_header", 2)])
def test_truncated_tar_yields_complete_samples_then_fails(cut, complete, tmp_path):
    """Cut inside sample 3: samples known to be complete come out, then the shard fails. Sample 2
    is known complete only once sample 3's header was read; at a bare boundary it is withheld."""
    ds = write_synthetic(str(tmp_path), "webdataset", num_shards=1, images_per_shard=6, captions=False)
    path = tmp_path / "00000.tar"
    data = path.read_bytes()
    with tarfile.open(path) as tar:
        boundary = next(m.offset for m in tar.getmembers() if m.name == f"{ds.shard_keys[0][3]}.jpg")
    end = {"mid_data": boundary + 700, "member_boundary": boundary, "mid_header": boundary + 100}[cut]
    path.write_bytes(data[:end])
    shard = list_source(str(tmp_path)).shards[0]
    keys = []
    with pytest.raises(BadShard, match=f"cannot read webdataset shard {shard.url}: "):  # no retry helps
        for record in iter_records(shard):
            keys.append(record.key)
    assert keys == list(ds.shard_keys[0][:complete])


def test_parquet_plain_binary_image_column_and_passthrough(tmp_path):
    table = pa.table({
        "image": pa.array([b"a", b"b", None], pa.binary()),
        "label": pa.array([1, None, 0], pa.int32()),
        "url": ["u0", "u1", "u2"],
    })
    pq.write_table(table, tmp_path / "part-0.parquet", row_group_size=2)
    listing = list_source(str(tmp_path))
    assert (listing.has_labels, listing.label_names, listing.has_captions) == (True, None, False)
    assert [(r.key, r.image, r.label, r.extra) for r in read_all(listing)[0]] == [
        ("part-0:0", b"a", 1, {}),  # columns not asked for are not read
        ("part-0:1", b"b", None, {}),
        ("part-0:2", None, 0, {}),
    ]
    assert [r.extra for r in iter_records(listing.shards[0], columns=["url"])] == [{"url": f"u{i}"} for i in range(3)]


def test_parquet_struct_without_path_keys_by_row_and_missing_image_column_fails(tmp_path):
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    images = pa.array([{"bytes": b"a", "path": ""}, {"bytes": b"b", "path": "b.jpg"}], image_type)
    pq.write_table(pa.table({"image": images, "text": ["x", "y"]}), tmp_path / "s.parquet")
    listing = list_source(str(tmp_path))
    assert [(r.key, r.caption) for r in read_all(listing)[0]] == [("s:0", "x"), ("b.jpg", "y")]
    pq.write_table(pa.table({"url": ["u"]}), tmp_path / "s.parquet")
    with pytest.raises(SourceError, match="no image column"):
        list_source(str(tmp_path))


class CountingFileSystem(LocalFileSystem):
    """Local files under ``counting://`` that count the bytes read through them."""

    protocol = "counting"
    bytes_read = 0

    def _open(self, path, mode="rb", block_size=None, **kwargs):
        return CountingFile(self._strip_protocol(path), mode, fs=self, **kwargs)


class CountingFile(LocalFileOpener):
    def read(self, *args):
        data = super().read(*args)
        self.fs.bytes_read += len(data)
        return data


@pytest.mark.parametrize("fmt", ["webdataset", "parquet"])
def test_first_record_arrives_without_reading_the_whole_shard(fmt, tmp_path):
    fsspec.register_implementation("counting", CountingFileSystem, clobber=True)
    ds = write_synthetic(str(tmp_path), fmt, num_shards=1, images_per_shard=256, image_size=(96, 96))
    shard = list_source(f"counting://{tmp_path}").shards[0]
    fs = fsspec.filesystem("counting")
    fs.bytes_read = 0
    records = iter_records(shard)
    assert next(records).key == ds.shard_keys[0][0]
    assert fs.bytes_read < shard.size / 4
    assert len(list(records)) == 255 and fs.bytes_read >= shard.size * 0.9


def test_oversized_tar_members_are_skipped_unread_with_a_reason(tmp_path):
    big = bytes(range(256)) * 64  # 16 KiB
    write_tar(tmp_path / "a.tar", [("a.jpg", b"small"), ("b.jpg", big), ("b.txt", b"caption"), ("c.json", big),
                                   ("d.jpg", b"fine")])
    shard = list_source(str(tmp_path)).shards[0]
    records = {r.key: r for r in iter_records(shard, max_member_bytes=len(big) - 1)}
    assert [k for k in records] == ["a", "b", "c", "d"]
    assert records["b"].image is None and records["b"].skip_reason == (
        f"member too large: .jpg is {len(big)} bytes (limit {len(big) - 1})")
    assert records["c"].skip_reason.startswith("member too large: .json")
    assert records["a"].skip_reason is None and records["d"].image == b"fine"
    assert {r.key: r.image for r in iter_records(shard)}["b"] == big  # the default limit is far larger


def test_format_auto_refuses_a_mix_but_accepts_img2dataset_metadata(tmp_path):
    mixed = tmp_path / "mixed"
    write_synthetic(str(mixed), "imagefolder", num_shards=1, images_per_shard=3)
    write_tar(mixed / "stray.tar", [("x.jpg", b"X")])
    with pytest.raises(SourceError, match=r"--format auto found more than one input format: 1 webdataset files "
                                          r"\(e\.g\. \S*/stray\.tar\), 3 imagefolder files \(e\.g\. "):
        list_source(str(mixed))
    assert list_source(str(mixed), format="imagefolder").format == "imagefolder"
    img2dataset = tmp_path / "img2dataset"  # 00000.tar with its 00000.parquet metadata beside it
    write_synthetic(str(img2dataset), "webdataset", num_shards=2, images_per_shard=2)
    for stem in ("00000", "00001"):
        pq.write_table(pa.table({"key": ["a"], "status": ["success"]}), img2dataset / f"{stem}.parquet")
    assert list_source(str(img2dataset)).format == "webdataset"
    pq.write_table(pa.table({"key": ["a"]}), img2dataset / "other.parquet")
    with pytest.raises(SourceError, match="more than one input format"):
        list_source(str(img2dataset))
