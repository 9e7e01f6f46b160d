"""Stream the records of one input shard."""
from __future__ import annotations

from collections.abc import Iterator

from pipeline.layout import filesystem
from pipeline.records import InputShard, Record
from pipeline.sources.imagefolder import read_imagefolder
from pipeline.sources.parquet import read_parquet
from pipeline.sources.storage import SourceError, storage_errors
from pipeline.sources.webdataset import read_webdataset


def iter_records(shard: InputShard, storage_options: dict | None = None) -> Iterator[Record]:
    """The shard's records in a deterministic order, streamed (never the whole shard in memory).

    Any failure (unreachable storage, missing file, truncated or corrupt shard) raises
    ``SourceError`` naming the shard URL, possibly after some records were yielded: a shard that
    cannot be read to its end fails as a whole rather than coming out silently short.
    """
    with storage_errors(f"cannot read {shard.format} shard", shard.url, storage_options):
        fs, path = filesystem(shard.url, storage_options)
        if shard.format == "webdataset":
            yield from read_webdataset(fs, path)
        elif shard.format == "parquet":
            yield from read_parquet(fs, path)
        elif shard.format == "imagefolder":
            yield from read_imagefolder(fs, path, shard.members)
        else:
            raise SourceError(f"unknown format {shard.format!r}")
