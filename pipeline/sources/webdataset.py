"""Streaming reader for webdataset tar shards (img2dataset layout)."""
from __future__ import annotations

import posixpath
import tarfile
from collections.abc import Iterator

import fsspec

from pipeline.records import Record
from pipeline.sources.storage import BadShard, open_input

IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")  # preference order when a sample has several
_FIELDS = (*IMAGE_SUFFIXES, "txt", "json", "cls")
_BLOCK = tarfile.BLOCKSIZE
DEFAULT_MAX_MEMBER_BYTES = 128 << 20  # a larger member is skipped unread, with its reason
MEMBER_TOO_LARGE = "member too large"


def split_member(name: str) -> tuple[str, str]:
    """``(__key__, suffix)``: the key is the normalised path up to the first dot of the basename.

    Keys are plain strings: leading ``/`` and ``./`` are dropped, ``..`` is kept as text.
    """
    name = posixpath.normpath(name).lstrip("/")
    folder, base = posixpath.split(name)
    stem, _, suffix = base.partition(".")
    return posixpath.join(folder, stem), suffix.lower()


def _record(key: str, fields: dict[str, bytes], skip_reason: str | None = None) -> Record:
    if skip_reason is not None:
        return Record(key=key, image=None, skip_reason=skip_reason)
    image = next((fields[s] for s in IMAGE_SUFFIXES if s in fields), None)
    label = None
    if "cls" in fields:
        text = fields["cls"].decode("utf-8", "replace").strip()
        if not text.lstrip("-").isdigit():
            raise BadShard(f"sample {key!r}: .cls is not an integer: {text[:40]!r}")
        label = int(text)
    caption = fields["txt"].decode("utf-8", "replace") if "txt" in fields else None
    extra = {"json": fields["json"].decode("utf-8", "replace")} if "json" in fields else {}
    return Record(key=key, image=image, label=label, caption=caption, extra=extra)


def _check_end(f, offset: int) -> None:
    """A complete tar has a zero block where the member headers stop; anything else is a hole."""
    f.seek(offset)
    if f.read(_BLOCK) != bytes(_BLOCK):
        raise BadShard(f"tar is truncated or corrupt: no end-of-archive block at byte {offset}")


def read_webdataset(
    fs: fsspec.AbstractFileSystem, path: str, max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES
) -> Iterator[Record]:
    """Records in member order, one per run of consecutive members sharing a ``__key__``.

    Streams with ``tarfile`` mode ``r|`` (one pass, no seeking back), holding one sample at a
    time. A sample without an image member yields ``image=None``. Non-file members are ignored.
    A sample with a member above ``max_member_bytes`` is not read: it comes with ``skip_reason``.
    A truncated or corrupt archive raises ``BadShard`` after the complete samples before the
    damage, and before the last sample, which may be incomplete.
    """
    with open_input(fs, path) as f:
        with tarfile.open(fileobj=f, mode="r|") as tar:
            key, fields, too_large = None, {}, None
            while (member := tar.next()) is not None:
                tar.members.clear()  # the stream reader keeps every header otherwise
                if not member.isfile():
                    continue
                member_key, suffix = split_member(member.name)
                if member_key != key:
                    if key is not None:
                        yield _record(key, fields, too_large)
                    key, fields, too_large = member_key, {}, None
                if suffix not in _FIELDS or suffix in fields or too_large:
                    continue
                if member.size > max_member_bytes:  # tar.next() skips its bytes without keeping them
                    too_large = f"{MEMBER_TOO_LARGE}: .{suffix} is {member.size} bytes (limit {max_member_bytes})"
                else:
                    fields[suffix] = tar.extractfile(member).read()
            end = tar.offset
        _check_end(f, end)
    if key is not None:
        yield _record(key, fields, too_large)
