"""Input notation: several INPUTs, ``@list`` files and brace groups, expanded into shard names.

- ``{00000..41455}``: an integer range, both ends included, zero-padded to the wider end when
  either end has a leading zero (the webdataset / bash notation).
- ``{a,b,c}``: a list. Several groups in one pattern multiply; groups do not nest. Braces that
  hold neither a range nor a list are part of the name.
- ``@URL``: a text file (local or any fsspec URL) with one input per line; blank lines and ``#``
  comments are skipped, a relative line is relative to the list file's folder, lines may hold
  groups.

An INPUT without groups keeps its meaning: a folder, a file or a glob. A name made by a group or
read from a list is a *named* shard (or folder) and must exist; ``locate`` checks names with one
listing per parent folder (on S3 one paginated LIST per prefix instead of a HEAD per shard).
"""
from __future__ import annotations

import itertools
import math
import posixpath
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import fsspec

from pipeline.layout import filesystem
from pipeline.sources.storage import SourceError, storage_errors

GLOB_CHARS = "*?["
MAX_NAMES = 1_000_000  # a typo such as {0..99999999} fails instead of filling memory
_GROUP = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"(-?\d+)\.\.(-?\d+)")


@dataclass(frozen=True)
class ExpandedInputs:
    patterns: tuple[str, ...]  # folders, files or globs, listed as a single INPUT always was
    named: tuple[str, ...]     # shard (or folder) names from groups and list files: must exist


@dataclass
class Located:
    """What the named inputs turned out to be."""

    files: list[tuple[str, int | None]] = field(default_factory=list)  # (URL, size)
    folders: list[str] = field(default_factory=list)  # named folders: searched like a folder INPUT
    missing: list[str] = field(default_factory=list)  # URLs that do not exist


def has_glob(name: str) -> bool:
    return any(c in name for c in GLOB_CHARS)


def _padded(end: str) -> bool:
    digits = end.lstrip("-")
    return len(digits) > 1 and digits.startswith("0")


def _choices(body: str) -> list[str] | None:
    """The expansions of one ``{body}``; None when it is neither a range nor a list."""
    if m := _RANGE.fullmatch(body):
        lo, hi = int(m[1]), int(m[2])
        if abs(hi - lo) >= MAX_NAMES:
            raise SourceError(f"brace range {{{body}}} names more than {MAX_NAMES} shards")
        width = max(len(m[1]), len(m[2])) if _padded(m[1]) or _padded(m[2]) else 0
        step = 1 if hi >= lo else -1
        return [f"{i:0{width}d}" for i in range(lo, hi + step, step)]
    return body.split(",") if "," in body else None


def expand_braces(pattern: str) -> list[str]:
    """Every name ``pattern`` stands for, in group order (a pattern without groups: itself)."""
    pieces: list[list[str]] = []
    pos = 0
    for m in _GROUP.finditer(pattern):
        choices = _choices(m[1])
        if choices is not None:
            pieces += [[pattern[pos:m.start()]], choices]
            pos = m.end()
    if not pieces:
        return [pattern]
    pieces.append([pattern[pos:]])
    literal = "".join(_GROUP.sub("", p[0]) for p in pieces[::2])  # braces left outside any group
    if "{" in literal or "}" in literal:
        raise SourceError(f"unbalanced or nested braces in {pattern!r} (brace groups do not nest)")
    if math.prod(len(p) for p in pieces) > MAX_NAMES:
        raise SourceError(f"{pattern!r} names more than {MAX_NAMES} shards")
    return ["".join(parts) for parts in itertools.product(*pieces)]


def _resolve(list_url: str, line: str) -> str:
    """``line`` of the list file at ``list_url``: as written when absolute, else relative to its folder."""
    folder = list_url.rpartition("/")[0]
    if "://" in line or line.startswith("/") or not folder:
        return line
    scheme, sep, path = folder.rpartition("://")
    return scheme + sep + posixpath.normpath(posixpath.join(path, line))


def read_list(url: str, storage_options: dict | None = None) -> list[str]:
    """The inputs a list file names, relative lines resolved against its folder."""
    with storage_errors("cannot read list file", url, storage_options):
        fs, path = filesystem(url, storage_options)
        text = fs.cat_file(path).decode("utf-8")
    lines = [line.strip() for line in text.splitlines()]
    names = [_resolve(url, line) for line in lines if line and not line.startswith("#")]
    if not names:
        raise SourceError(f"list file {url} names no inputs")
    return names


def expand_inputs(inputs: Sequence[str], storage_options: dict | None = None) -> ExpandedInputs:
    """Split INPUT arguments into plain patterns and named shards (``@file`` lists read here)."""
    patterns: list[str] = []
    named: list[str] = []
    for text in inputs:
        if text.startswith("@"):
            items = [(name, True) for line in read_list(text[1:], storage_options) for name in expand_braces(line)]
        else:
            names = expand_braces(text)
            items = [(name, names != [text]) for name in names]
        for name, is_named in items:
            (named if is_named and not has_glob(name) else patterns).append(name)
    if len(patterns) + len(named) > MAX_NAMES:
        raise SourceError(f"the inputs name more than {MAX_NAMES} shards")
    return ExpandedInputs(tuple(patterns), tuple(dict.fromkeys(named)))


def _entries(fs: fsspec.AbstractFileSystem, parent: str, paths: Sequence[str]) -> dict[str, dict]:
    """path -> info of those of ``paths`` that exist, from one listing of ``parent``."""
    if len(paths) == 1 or not parent:  # a lone name (or a bucket): one request either way
        found = {}
        for path in paths:
            try:
                found[path] = fs.info(path)
            except FileNotFoundError:
                pass
        return found
    fs.invalidate_cache(parent)
    try:
        listed = fs.ls(parent, detail=True)
    except FileNotFoundError:
        return {}
    wanted = set(paths)
    return {name: e for e in listed if (name := e["name"].rstrip("/")) in wanted}


def locate(names: Sequence[str], storage_options: dict | None = None) -> Located:
    """Sort named URLs into files (with sizes), folders and missing names, listing each parent
    folder once."""
    filesystems: dict[str, fsspec.AbstractFileSystem] = {}
    folders: dict[tuple[str, str], list[str]] = defaultdict(list)
    for name in names:
        protocol = fsspec.core.split_protocol(name)[0] or "file"
        if protocol not in filesystems:
            filesystems[protocol] = filesystem(name, storage_options)[0]
        path = filesystems[protocol]._strip_protocol(name)
        folders[(protocol, path.rpartition("/")[0])].append(path)
    located = Located()
    for (protocol, parent), paths in folders.items():
        fs = filesystems[protocol]
        entries = _entries(fs, parent, paths)
        for path in paths:
            url, info = fs.unstrip_protocol(path), entries.get(path)
            if info is None:
                located.missing.append(url)
            elif info["type"] == "directory":
                located.folders.append(url)
            else:
                located.files.append((url, info.get("size")))
    return located
