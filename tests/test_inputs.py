"""Input notation (brace ranges and lists, several INPUTs, @list files, missing shards) and
passthrough columns (--keep) at listing and conversion level, locally and on moto S3."""
from __future__ import annotations

import json
import os

import fsspec
import pytest

from pipeline.records import DecodedImage
from pipeline.schema import TokenSchema
from pipeline.sources import SourceError, iter_records, list_source
from pipeline.sources.expand import expand_braces, locate
from pipeline.sources.passthrough import KeptValues, parse_keep
from pipeline.synthetic import write_synthetic
from tests.faults import FaultyS3Proxy
from tests.laion_fixtures import COARSE_NAMES, laion_shards, write_imagenet_parquet, write_laion
from tests.test_sources import CountingFileSystem, location  # noqa: F401 - location is a fixture


@pytest.mark.parametrize(("pattern", "names"), [
    ("s/{00000..00003}.tar", ["s/00000.tar", "s/00001.tar", "s/00002.tar", "s/00003.tar"]),
    ("{8..11}", ["8", "9", "10", "11"]),            # no leading zero: no padding
    ("{0..010}", [f"{i:03d}" for i in range(11)]),  # padded to the wider end
    ("{3..1}", ["3", "2", "1"]),
    ("{train,val}-{0..1}.tar", ["train-0.tar", "train-1.tar", "val-0.tar", "val-1.tar"]),
    ("a{,_x}.tar", ["a.tar", "a_x.tar"]),
    ("s3://b/x{y}.tar", ["s3://b/x{y}.tar"]),          # neither a range nor a list: part of the name
    ("plain/path.tar", ["plain/path.tar"]),
])
def test_brace_expansion(pattern, names):
    assert expand_braces(pattern) == names


@pytest.mark.parametrize(("pattern", "error"), [
    ("{a,{b,c}}", "brace groups do not nest"),
    ("{0..9999999}", "more than 1000000"),
    ("{0..999}/{0..9999}", "more than 1000000"),
])
def test_brace_errors(pattern, error):
    with pytest.raises(SourceError, match=error):
        expand_braces(pattern)


def test_ranges_lists_and_several_inputs_give_one_sorted_listing(tmp_path):
    d = tmp_path / "data"
    write_synthetic(str(d), "webdataset", num_shards=6, images_per_shard=1, captions=False)
    whole = list_source(str(d)).shards
    (d / "list.txt").write_text(f"# img2dataset shards\n00004.tar\n\n 00005.tar \n{d}/0000{{0..3}}.tar\n")
    for inputs in [
        f"{d}/{{00000..00005}}.tar",
        [f"{d}/{{00003..00005}}.tar", f"{d}/0000{{0,1,2}}.tar"],
        [f"{d}/{{00000..00003}}.tar", f"{d}/{{00002..00005}}.tar"],   # overlap: each shard once
        [f"{d}/0000[0-2].tar", f"file://{d}/{{00003..00005}}.tar"],    # a glob and a range
        f"@{d}/list.txt",                                              # relative lines, comments, braces
    ]:
        listing = list_source(inputs)
        assert listing.shards == whole, inputs
        assert listing.missing == () and listing.num_shards == 6
    assert list_source([f"{d}/00001.tar", str(d)]).shards == whole  # a folder and a file in it


def test_missing_named_shards_fail_before_any_work_or_are_recorded(location):
    url, options = location
    write_synthetic(url, "webdataset", num_shards=4, images_per_shard=2, storage_options=options)
    fs, root = fsspec.core.url_to_fs(url, **(options or {}))
    fs.rm(f"{root}/00001.tar")
    base = fs.unstrip_protocol(root)
    with pytest.raises(SourceError, match=(
        rf"3 of 6 named shards do not exist: {base}/00001.tar, {base}/00004.tar, {base}/00005.tar; --allow-missing"
    )):
        list_source(f"{url}/{{00000..00005}}.tar", storage_options=options)

    listing = list_source(f"{url}/{{00000..00005}}.tar", storage_options=options, allow_missing=True)
    assert [(s.index, s.url) for s in listing.shards] == [(i, f"{base}/{i:05d}.tar") for i in (0, 2, 3)]
    assert [(s.index, s.url, s.size) for s in listing.missing] == [(i, f"{base}/{i:05d}.tar", None) for i in (1, 4, 5)]
    assert listing.num_shards == 6 and all(s.size > 0 for s in listing.shards)
    assert [len(list(iter_records(s, options))) for s in listing.shards] == [2, 2, 2]

    with pytest.raises(SourceError, match=r"17 of 20 named shards do not exist: .*00007.tar and 12 more;"):
        list_source(f"{url}/{{00000..00019}}.tar", storage_options=options)
    with pytest.raises(SourceError, match="none of the 2 named shards exist"):
        list_source(f"{url}/{{00007..00008}}.tar", storage_options=options, allow_missing=True)


def test_s3_existence_check_lists_the_prefix_once(s3):
    bucket = s3.bucket()
    fs = fsspec.filesystem("s3", **s3.storage_options)
    fs.pipe({f"{bucket}/shards/{i:05d}.tar": b"x" * (i % 7 + 1) for i in range(40)})
    names = [f"s3://{bucket}/shards/{i:05d}.tar" for i in range(41)]
    with FaultyS3Proxy(s3.endpoint_url, rate=0.0) as proxy:
        located = locate(names, {**s3.storage_options, "endpoint_url": proxy.url})
        requests = proxy.counts["requests"]
    assert requests <= 2, f"{requests} requests for 41 names: one paginated LIST expected, not a HEAD per shard"
    assert located.files == [(n, i % 7 + 1) for i, n in enumerate(names[:40])]
    assert located.missing == [names[40]] and located.folders == []


def test_list_file_on_s3_with_folders_and_globs(s3_bucket, s3):
    so = s3.storage_options
    write_synthetic(f"{s3_bucket}/a", "webdataset", num_shards=2, images_per_shard=1, storage_options=so)
    write_synthetic(f"{s3_bucket}/b", "webdataset", num_shards=2, images_per_shard=1, storage_options=so)
    fsspec.filesystem("s3", **so).pipe_file(f"{s3_bucket}/lists/all.txt".removeprefix("s3://"), b"../a\n../b/*.tar\n")
    listing = list_source(f"@{s3_bucket}/lists/all.txt", storage_options=so)
    assert [s.url for s in listing.shards] == [f"{s3_bucket}/{p}/0000{i}.tar" for p in "ab" for i in range(2)]


def test_image_folders_take_one_input(tmp_path):
    ds = write_synthetic(str(tmp_path / "img"), "imagefolder", num_shards=1, images_per_shard=4, num_classes=2)
    with pytest.raises(SourceError, match="an image folder is read from one INPUT"):
        list_source([str(tmp_path / "img" / name) for name in ds.label_names])
    with pytest.raises(SourceError, match=f"not found: {tmp_path}/nope"):
        list_source([str(tmp_path / "img"), str(tmp_path / "nope")])
    with pytest.raises(SourceError, match="an image folder has no fields to keep"):
        list_source(str(tmp_path / "img"), keep=["url"])


LAION_TYPES = {
    "AESTHETIC_SCORE": "float64", "caption": "string", "error_message": "string", "exif": "json",
    "height": "int64", "key": "string", "original_height": "int64", "original_width": "int64",
    "sha256": "string", "similarity": "float64", "status": "string", "url": "string", "width": "int64",
}


def test_json_sidecar_fields_are_typed_from_the_first_shard(tmp_path):
    write_laion(str(tmp_path))
    every = list_source(str(tmp_path), keep_all_json=True).kept
    assert {f.source: f.json_type for f in every} == LAION_TYPES
    assert [f.source for f in every] == sorted(LAION_TYPES)
    columns = {f.source: f.column for f in every}  # our own names get a prefix
    assert [columns[k] for k in ("key", "caption", "width", "height", "url")] == [
        "src_key", "src_caption", "src_width", "src_height", "url"]
    assert {f.column: f.feature for f in every}["exif"] == {"dtype": "string", "_type": "Value"}

    chosen = list_source(str(tmp_path), keep=["url,AESTHETIC_SCORE", "original_width:float64"]).kept
    assert [(f.column, f.json_type) for f in chosen] == [
        ("url", "string"), ("AESTHETIC_SCORE", "float64"), ("original_width", "float64")]
    assert list_source(str(tmp_path), keep=["later_field:int64"]).kept[0].json_type == "int64"
    with pytest.raises(SourceError, match=r"--keep aesthetic: not a field of the 6 .json sidecars sampled .*AESTHETIC_SCORE"):
        list_source(str(tmp_path), keep=["aesthetic"])
    write_laion(str(tmp_path), [[("k0", {"key": "a", "src_key": "b"})]])
    with pytest.raises(SourceError, match=r"share the output column\(s\) \['src_key'\]"):
        list_source(str(tmp_path / "00000.tar"), keep_all_json=True)


def test_later_values_of_another_type_become_counted_nulls(tmp_path):
    write_laion(str(tmp_path))
    listing = list_source(str(tmp_path), keep_all_json=True)
    schema = TokenSchema(8, 1, kept=listing.kept)
    kept = KeptValues(listing.kept, schema.kept_types())
    rows = [DecodedImage(r.key, None, 48, 40, extra=r.extra) for r in iter_records(listing.shards[1])]
    values = {r.key: r.extra for r in kept.apply(rows)}
    assert [values["000100000"][c] for c in ("similarity", "url", "AESTHETIC_SCORE")] == [
        None, "https://images.example.com/1/0.jpg", 5.0]
    assert values["000100001"]["original_width"] is None and values["000100001"]["similarity"] == 0.26
    assert set(values["000100002"].values()) == {None} and set(values["000100003"].values()) == {None}
    assert values["000100004"]["AESTHETIC_SCORE"] == 7.0 and isinstance(values["000100004"]["AESTHETIC_SCORE"], float)
    assert json.loads(values["000100005"]["exif"]) == {"GPS": [1, 2], "Image Make": "Nikon"}
    assert values["000100005"]["error_message"] is None  # JSON null: null, not counted
    per_field = {"invalid_json": 1, "missing": 1}
    assert kept.nulls == {
        c: {**per_field, **({"wrong_type": 1} if c in ("similarity", "original_width") else {})}
        for c in sorted(f.column for f in listing.kept)
    }
    first = kept.apply([DecodedImage(r.key, None, 1, 1, extra=r.extra) for r in iter_records(listing.shards[0])])
    assert [r.extra["AESTHETIC_SCORE"] for r in first] == [5.0, 5.5, None, 6.5, 7.0, 7.5]
    assert kept.nulls["exif"]["missing"] == 2 and json.loads(first[1].extra["exif"]) == {}


def test_keep_specs():
    assert parse_keep(["a,b:float64", " c ", "a:json", "x:y"]) == {"a": "json", "b": "float64", "c": None, "x:y": None}
    with pytest.raises(SourceError, match="given the types int64 and bool"):
        parse_keep(["a:int64", "a:bool"])


def test_parquet_keep_reads_only_those_columns_with_their_features(tmp_path):
    fsspec.register_implementation("counting", CountingFileSystem, clobber=True)
    write_imagenet_parquet(str(tmp_path), num_shards=1, rows=8, drift=False)
    listing = list_source(f"counting://{tmp_path}", keep=["coarse,bbox,score", "label"])
    features = {f.column: f.feature for f in listing.kept}
    assert features == {
        "coarse": {"names": COARSE_NAMES, "_type": "ClassLabel"},
        "bbox": {"feature": {"dtype": "float32", "_type": "Value"}, "_type": "List"},
        "score": {"dtype": "float32", "_type": "Value"},  # no feature in the metadata: from the Arrow type
        "src_label": {"names": ["tench", "goldfish", "shark"], "_type": "ClassLabel"},
    }
    fs = fsspec.filesystem("counting")
    fs.bytes_read = 0
    shard = listing.shards[0]
    records = list(iter_records(shard, columns=[f.source for f in listing.kept]))
    assert fs.bytes_read < shard.size / 3, "the 64 KiB blob column of every row must not be read"
    assert records[3].extra == {"label": 0, "coarse": 1, "bbox": pytest.approx([0.3, 0.2, 0.5, 0.75]), "score": 1.5}

    with pytest.raises(SourceError, match="--keep synth: no such column .* synset"):
        list_source(str(tmp_path), keep=["synth"])
    with pytest.raises(SourceError, match="Parquet columns keep their own type"):
        list_source(str(tmp_path), keep=["score:float64"])
    with pytest.raises(SourceError, match="--keep-all-json keeps webdataset .json sidecar fields; the input is parquet"):
        list_source(str(tmp_path), keep_all_json=True)
    assert os.path.getsize(shard.url.removeprefix("counting://")) == shard.size


def test_dataset_card_lists_kept_columns_with_their_types(tmp_path):
    from pipeline.card import render_card
    from pipeline.manifest import TokenizerInfo, build_manifest
    from tokenizer.transform import ImageTransform

    tok = TokenizerInfo("titok", "tiny", "here", "f" * 64, 8, 16, False, 32)

    def card(listing) -> str:
        manifest = build_manifest(tok, ImageTransform(32, "center"), "fp32", listing, "train")
        return render_card(manifest, {"train": {"shards": 1, "done": 1, "rows": 1, "skipped": 0}})

    write_laion(str(tmp_path / "laion"))
    laion = card(list_source(str(tmp_path / "laion"), keep=["url,AESTHETIC_SCORE,exif,key", "original_width:float64"]))
    assert "| column | type | from |\n|---|---|---|\n" + "\n".join([
        "| `url` | string | `.json` field `url` |",
        "| `AESTHETIC_SCORE` | float64 | `.json` field `AESTHETIC_SCORE` |",
        "| `exif` | string (JSON text: json.loads) | `.json` field `exif` |",
        "| `src_key` | string | `.json` field `key` |",
        "| `original_width` | float64 | `.json` field `original_width` |",
    ]) + "\n" in laion

    write_imagenet_parquet(str(tmp_path / "imagenet"), num_shards=1, rows=2, drift=False)
    imagenet = card(list_source(str(tmp_path / "imagenet"), keep=["coarse,bbox,score"]))
    assert "| `coarse` | ClassLabel (2 names: animal, object) | Parquet column `coarse` |\n" \
           "| `bbox` | list<float32> | Parquet column `bbox` |\n" \
           "| `score` | float32 | Parquet column `score` |\n" in imagenet
    assert "Kept source columns" not in card(list_source(str(tmp_path / "imagenet")))
