"""Turn an input URL into a sorted list of shards (no image is read)."""
from __future__ import annotations

from contextlib import closing

import fsspec

from pipeline.layout import filesystem
from pipeline.records import FORMATS, InputShard, SourceListing
from pipeline.sources import imagefolder
from pipeline.sources.parquet import read_columns
from pipeline.sources.storage import SourceError, is_hidden, storage_errors
from pipeline.sources.webdataset import read_webdataset

EXTENSIONS = {"webdataset": (".tar",), "parquet": (".parquet",), "imagefolder": imagefolder.IMAGE_EXTENSIONS}
_GLOB_CHARS = "*?["

Files = list[tuple[str, int | None]]  # (path relative to the root, size in bytes), sorted


def _expand(fs: fsspec.AbstractFileSystem, path: str) -> tuple[str, Files]:
    """``(root, files)``: a glob's fixed prefix, a directory, or a single file's parent, and the
    non-hidden files under it (recursively), sorted by path."""
    if any(c in path for c in _GLOB_CHARS):
        parts = path.split("/")
        fixed = next(i for i, part in enumerate(parts) if any(c in part for c in _GLOB_CHARS))
        root, infos = "/".join(parts[:fixed]), fs.glob(path, detail=True).values()
    else:
        info = fs.info(path)
        if info["type"] == "directory":
            root, infos = path, fs.find(path, detail=True).values()
        else:
            root, infos = path.rpartition("/")[0], [info]
    root = root.rstrip("/")
    files = [
        (info["name"][len(root) + 1:], info.get("size"))
        for info in infos
        if info["type"] == "file" and info["name"].startswith(root + "/")
    ]
    return root, sorted(f for f in files if not is_hidden(f[0]))


def _pick_format(requested: str, files: Files) -> tuple[str, Files]:
    """The format and its files; ``auto`` prefers tar, then Parquet, then images."""
    matching = {fmt: [f for f in files if f[0].lower().endswith(EXTENSIONS[fmt])] for fmt in FORMATS}
    if requested == "auto":
        for fmt in FORMATS:
            if matching[fmt]:
                return fmt, matching[fmt]
        raise SourceError(f"no .tar, .parquet or image files among {len(files)} files")
    if not matching[requested]:
        found = ", ".join(f"{len(v)} {fmt} files" for fmt, v in matching.items() if v) or f"{len(files)} other files"
        raise SourceError(f"format {requested!r} needs {'/'.join(EXTENSIONS[requested])} files, found {found}")
    return requested, matching[requested]


def list_source(
    url: str,
    format: str = "auto",
    storage_options: dict | None = None,
    images_per_shard: int = 1000,
) -> SourceListing:
    """List the input shards at ``url`` (fsspec URL or local path: a directory, a file or a glob).

    A directory is searched recursively (hidden files skipped). Shards are sorted by path and
    ``InputShard.index`` is the position. Image folders are chunked into shards of
    ``images_per_shard`` images in sorted path order; labels come from class subfolders (label id =
    position among the sorted subfolders of the root). Webdataset labels/captions are detected from
    the first sample, Parquet columns and ClassLabel names from the first shard's footer.
    Raises ``SourceError`` (naming ``url``, never a credential) for a missing, empty, unreachable
    or mismatched input.
    """
    if format not in ("auto", *FORMATS):
        raise SourceError(f"format must be auto or one of {FORMATS}, not {format!r}")
    if images_per_shard < 1:
        raise SourceError(f"images_per_shard must be >= 1, not {images_per_shard}")
    with storage_errors("cannot list", url, storage_options):
        fs, path = filesystem(url, storage_options)
        root, files = _expand(fs, path)
        fmt, files = _pick_format(format, files)
        if fmt == "imagefolder":
            labelled = imagefolder.is_labelled([rel for rel, _ in files])
            shards = imagefolder.chunk_shards(fs.unstrip_protocol(root), files, images_per_shard)
            names = imagefolder.class_names(fs, root) if labelled else None
            return SourceListing(url, fmt, shards, label_names=names, has_labels=labelled)
        shards = tuple(
            InputShard(index=i, url=fs.unstrip_protocol(f"{root}/{rel}"), format=fmt, size=size)
            for i, (rel, size) in enumerate(files)
        )
        first = f"{root}/{files[0][0]}"
        if fmt == "parquet":
            cols = read_columns(fs, first)
            return SourceListing(url, fmt, shards, cols.label_names, cols.label is not None, cols.caption is not None)
        with closing(read_webdataset(fs, first)) as records:
            sample = next(records, None)
        return SourceListing(
            url, fmt, shards,
            has_labels=sample is not None and sample.label is not None,
            has_captions=sample is not None and sample.caption is not None,
        )
