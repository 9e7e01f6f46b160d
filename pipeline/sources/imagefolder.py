"""Folders of image files: deterministic chunking into shards, labels from class subfolders."""
from __future__ import annotations

import posixpath
from collections.abc import Iterator, Sequence

import fsspec

from pipeline.records import InputShard, Record
from pipeline.sources.storage import BadShard, SourceError, is_hidden

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
FETCH_BATCH = 32  # images fetched concurrently (remote stores) per step


def class_names(fs: fsspec.AbstractFileSystem, root: str) -> tuple[str, ...]:
    """Sorted names of the non-hidden subfolders of ``root``; label id = position."""
    entries = fs.ls(root, detail=True)
    return tuple(sorted(
        name for e in entries
        if e["type"] == "directory" and not is_hidden(name := posixpath.basename(e["name"].rstrip("/")))
    ))


def is_labelled(members: Sequence[str]) -> bool:
    """True when every image sits in a class subfolder, False when all sit at the top level."""
    nested = {"/" in m for m in members}
    if len(nested) > 1:
        raise SourceError("image folder mixes top-level images with images in class subfolders")
    return nested == {True}


def chunk_shards(
    root_url: str, files: Sequence[tuple[str, int | None]], images_per_shard: int
) -> tuple[InputShard, ...]:
    """Shards of ``images_per_shard`` consecutive members of ``files`` ((relative path, size), sorted)."""
    shards = []
    for index, start in enumerate(range(0, len(files), images_per_shard)):
        chunk = files[start:start + images_per_shard]
        sizes = [size for _, size in chunk]
        shards.append(InputShard(
            index=index,
            url=root_url,
            format="imagefolder",
            size=None if None in sizes else sum(sizes),
            members=tuple(rel for rel, _ in chunk),
        ))
    return tuple(shards)


def read_imagefolder(fs: fsspec.AbstractFileSystem, root: str, members: Sequence[str]) -> Iterator[Record]:
    """Records in member order; key = relative path, label = index of its class folder.

    Files are fetched ``FETCH_BATCH`` at a time (concurrently on async stores such as S3).
    """
    labels = {name: i for i, name in enumerate(class_names(fs, root))} if is_labelled(members) else None
    for start in range(0, len(members), FETCH_BATCH):
        chunk = members[start:start + FETCH_BATCH]
        blobs = fs.cat_ranges([f"{root}/{m}" for m in chunk], None, None, on_error="raise")
        for member, data in zip(chunk, blobs):
            yield Record(key=member, image=data, label=None if labels is None else _label(labels, member))


def _label(labels: dict[str, int], member: str) -> int:
    folder = member.split("/", 1)[0]
    if folder not in labels:
        raise BadShard(f"class folder {folder!r} of {member!r} is no longer under the root")
    return labels[folder]
