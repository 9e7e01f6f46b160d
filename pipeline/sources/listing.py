"""Turn an input URL into a sorted list of shards (no image is read)."""
from __future__ import annotations

import itertools
from collections.abc import Sequence
from contextlib import closing
from dataclasses import dataclass

import fsspec

from pipeline.layout import filesystem
from pipeline.records import FORMATS, InputShard, SourceListing
from pipeline.sources import imagefolder
from pipeline.sources.expand import expand_inputs, has_glob, locate
from pipeline.sources.parquet import read_columns
from pipeline.sources.passthrough import SAMPLE_SIDECARS, json_fields, parse_keep
from pipeline.sources.storage import SourceError, is_hidden, storage_errors
from pipeline.sources.webdataset import read_webdataset

EXTENSIONS = {"webdataset": (".tar",), "parquet": (".parquet",), "imagefolder": imagefolder.IMAGE_EXTENSIONS}
MISSING_SHOWN = 5  # missing shard names quoted in the error

Files = list[tuple[str, int | None]]  # (path relative to a root, or URL; size in bytes), sorted


def _expand(fs: fsspec.AbstractFileSystem, path: str) -> tuple[str, Files]:
    """``(root, files)``: a glob's fixed prefix, a directory, or a single file's parent, and the
    non-hidden files under it (recursively), sorted by path."""
    if has_glob(path):
        parts = path.split("/")
        fixed = next(i for i, part in enumerate(parts) if has_glob(part))
        root, infos = "/".join(parts[:fixed]), fs.glob(path, detail=True).values()
        if not any(info["type"] == "file" for info in infos):
            raise SourceError(f"no files match {fs.unstrip_protocol(path)}")
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


def _stems(files: Files) -> set[str]:
    return {rel.rsplit(".", 1)[0] for rel, _ in files}


def _pick_format(requested: str, files: Files) -> tuple[str, Files]:
    """The format and its files. ``auto`` needs exactly one format among the files, except that
    img2dataset's per-tar ``.parquet`` metadata files (same stem as a tar) go with webdataset."""
    matching = {fmt: [f for f in files if f[0].lower().endswith(EXTENSIONS[fmt])] for fmt in FORMATS}
    if requested == "auto":
        found = [fmt for fmt in FORMATS if matching[fmt]]
        if found == ["webdataset", "parquet"] and _stems(matching["parquet"]) <= _stems(matching["webdataset"]):
            found = ["webdataset"]
        if len(found) == 1:
            return found[0], matching[found[0]]
        if not found:
            raise SourceError(f"no .tar, .parquet or image files among {len(files)} files")
        what = ", ".join(f"{len(matching[fmt])} {fmt} files (e.g. {matching[fmt][0][0]})" for fmt in found)
        raise SourceError(f"--format auto found more than one input format: {what}; "
                          "pass --format, or point INPUT at the files of one format (a folder or a glob)")
    if not matching[requested]:
        found = ", ".join(f"{len(v)} {fmt} files" for fmt, v in matching.items() if v) or f"{len(files)} other files"
        raise SourceError(f"format {requested!r} needs {'/'.join(EXTENSIONS[requested])} files, found {found}")
    return requested, matching[requested]


def _missing_error(missing: list[str], named: int) -> SourceError:
    first = sorted(missing)[:MISSING_SHOWN]
    shown = ", ".join(first) + (f" and {len(missing) - len(first)} more" if len(missing) > len(first) else "")
    return SourceError(
        f"{len(missing)} of {named} named shards do not exist: {shown}; "
        "--allow-missing runs without them and records them in pretok.json"
    )


@dataclass
class _Found:
    files: dict[str, int | None]                           # URL -> size of every file found
    trees: list[tuple[fsspec.AbstractFileSystem, str]]     # (fs, root) of each searched folder/glob
    named: bool                                            # some inputs named shards
    missing: list[str]                                     # named URLs that do not exist


def _find(inputs: Sequence[str], storage_options: dict | None, allow_missing: bool) -> _Found:
    names = expand_inputs(inputs, storage_options)
    located = locate(names.named, storage_options)
    if located.missing and not (located.files or located.folders or names.patterns):
        raise SourceError(f"none of the {len(names.named)} named shards exist (first: {located.missing[0]})")
    if located.missing and not allow_missing:
        raise _missing_error(located.missing, len(names.named))
    found = _Found(dict(located.files), [], bool(names.named), located.missing)
    for pattern in (*names.patterns, *located.folders):
        fs, path = filesystem(pattern, storage_options)
        try:
            root, files = _expand(fs, path)
        except FileNotFoundError:
            if len(inputs) == 1:
                raise
            raise SourceError(f"not found: {pattern}") from None
        found.trees.append((fs, root))
        found.files.update((fs.unstrip_protocol(f"{root}/{rel}"), size) for rel, size in files)
    return found


def _image_folder(described: str, found: _Found, files: Files, images_per_shard: int) -> SourceListing:
    if len(found.trees) != 1 or found.named:
        raise SourceError(f"an image folder is read from one INPUT (a folder, a file or a glob), not {described!r}")
    fs, root = found.trees[0]
    prefix = len(fs.unstrip_protocol(root)) + 1
    files = [(url[prefix:], size) for url, size in files]
    labelled = imagefolder.is_labelled([rel for rel, _ in files])
    shards = imagefolder.chunk_shards(fs.unstrip_protocol(root), files, images_per_shard)
    label_names = imagefolder.class_names(fs, root) if labelled else None
    return SourceListing(described, "imagefolder", shards, label_names=label_names, has_labels=labelled)


def _shard_files(
    described: str, fmt: str, files: Files, missing: list[str], keep: dict[str, str | None], keep_all_json: bool,
    storage_options: dict | None,
) -> SourceListing:
    """Tar or Parquet shards (missing ones keep their place), described from the first one."""
    present = dict(files)
    absent = [url for url in missing if url.lower().endswith(EXTENSIONS[fmt])]
    ordered = sorted({*present, *absent})
    shards = tuple(InputShard(i, url, fmt, present[url]) for i, url in enumerate(ordered) if url in present)
    gone = tuple(InputShard(i, url, fmt) for i, url in enumerate(ordered) if url not in present)
    fs, first = filesystem(shards[0].url, storage_options)
    if fmt == "parquet":
        cols = read_columns(fs, first)
        return SourceListing(described, fmt, shards, cols.label_names, cols.label is not None,
                             cols.caption is not None, cols.kept_fields(keep, shards[0].url), gone)
    typing = bool(keep or keep_all_json)
    with closing(read_webdataset(fs, first)) as records:  # images are dropped as they stream by
        sample = next(records, None)
        rest = itertools.islice(records, SAMPLE_SIDECARS - 1 if typing else 0)
        sidecars = [r.extra.get("json") for r in itertools.chain([sample] if sample else [], rest)]
    return SourceListing(
        described, fmt, shards,
        has_labels=sample is not None and sample.label is not None,
        has_captions=sample is not None and sample.caption is not None,
        kept=json_fields(sidecars, keep, keep_all_json, shards[0].url) if typing else (),
        missing=gone,
    )


def list_source(
    url: str | Sequence[str],
    format: str = "auto",
    storage_options: dict | None = None,
    images_per_shard: int = 1000,
    keep: Sequence[str] = (),
    keep_all_json: bool = False,
    allow_missing: bool = False,
) -> SourceListing:
    """List the input shards of ``url``: one or several INPUTs (fsspec URLs or local paths), each
    a directory, a file, a glob, a pattern with brace groups or an ``@list`` file (``expand``).

    A directory is searched recursively (hidden files skipped). Shards are sorted by URL (each
    once) and ``InputShard.index`` is the position among all named shards, missing ones
    included, so output names do not depend on which shards exist yet. Named shards that do not
    exist fail the listing, naming the first few, unless ``allow_missing`` (then they are
    ``SourceListing.missing``). Image folders (one INPUT) are chunked into shards of
    ``images_per_shard`` images in sorted path order; labels come from class subfolders (label id
    = position among the sorted subfolders of the root). Webdataset labels/captions are detected
    from the first sample, Parquet columns and ClassLabel names from the first shard's footer.
    ``keep`` (``FIELD[:TYPE]`` specs) and ``keep_all_json`` choose the passthrough columns, typed
    from the first shard (``passthrough``). Raises ``SourceError`` (naming the input, never a
    credential) for a missing, empty, unreachable or mismatched input.
    """
    inputs = (url,) if isinstance(url, str) else tuple(url)
    if not inputs:
        raise SourceError("no input given")
    if format not in ("auto", *FORMATS):
        raise SourceError(f"format must be auto or one of {FORMATS}, not {format!r}")
    if images_per_shard < 1:
        raise SourceError(f"images_per_shard must be >= 1, not {images_per_shard}")
    described = " ".join(inputs)
    with storage_errors("cannot list", described, storage_options):
        kept = parse_keep(keep)
        found = _find(inputs, storage_options, allow_missing)
        fmt, files = _pick_format(format, sorted(found.files.items()))
        if keep_all_json and fmt != "webdataset":
            raise SourceError(f"--keep-all-json keeps webdataset .json sidecar fields; the input is {fmt}")
        if fmt == "imagefolder":
            if kept:
                raise SourceError("--keep: an image folder has no fields to keep")
            return _image_folder(described, found, files, images_per_shard)
        return _shard_files(described, fmt, files, found.missing, kept, keep_all_json, storage_options)
