"""Stream the records of one input shard."""
from __future__ import annotations

from collections.abc import Iterator, Sequence

from pipeline.layout import filesystem
from pipeline.records import InputShard, Record
from pipeline.sources.imagefolder import read_imagefolder
from pipeline.sources.parquet import read_parquet
from pipeline.sources.storage import SourceError, storage_errors
from pipeline.sources.webdataset import DEFAULT_MAX_MEMBER_BYTES, read_webdataset


def iter_records(
    shard: InputShard, storage_options: dict | None = None, columns: Sequence[str] = (),
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
) -> Iterator[Record]:
    """The shard's records in a deterministic order, streamed (never the whole shard in memory).

    ``columns``: Parquet source columns to read into ``Record.extra`` (the ``--keep`` columns);
    other formats ignore it (a webdataset's ``.json`` sidecar text is always in ``extra``).
    Tar members above ``max_member_bytes`` are skipped with a reason.

    Any failure raises ``SourceError`` naming the shard URL, possibly after some records were
    yielded: a shard that cannot be read to its end fails as a whole rather than coming out
    silently short. ``BadShard`` (a ``SourceError``) when the content is at fault (missing file,
    truncated or corrupt shard), so retrying cannot help.
    """
    with storage_errors(f"cannot read {shard.format} shard", shard.url, storage_options):
        fs, path = filesystem(shard.url, storage_options)
        if shard.format == "webdataset":
            yield from read_webdataset(fs, path, max_member_bytes)
        elif shard.format == "parquet":
            yield from read_parquet(fs, path, columns)
        elif shard.format == "imagefolder":
            yield from read_imagefolder(fs, path, shard.members)
        else:
            raise SourceError(f"unknown format {shard.format!r}")
