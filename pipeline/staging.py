"""Staged files and their cleanup: what killed actors and drivers leave behind.

Staged names start with the shard name (``{split}-{i}-of-{n}.{run_id}.``), so a run cleans only
its own split's leftovers; it does so while holding the split's lease, when no other run of that
split can be writing. Shared files (``pretok.json``, the card) are staged as ``{name}.*.tmp`` and
cleaned under the manifest lease.
"""
from __future__ import annotations

import hashlib
import logging
import os
import tempfile

from .layout import CARD, MANIFEST, OutputLayout, filesystem

log = logging.getLogger("pretok")


def worker_temp_prefix(root: str) -> str:
    """Prefix of an actor's local temp files for output ``root`` (remote outputs stage locally)."""
    return f"pretok-{hashlib.sha256(root.encode()).hexdigest()[:12]}-"


def _remove(paths: list[str]) -> int:
    n = 0
    for p in paths:
        try:
            os.unlink(p)
            n += 1
        except FileNotFoundError:
            pass
    return n


def list_names(folder: str) -> list[str]:
    """Names in a local folder; empty when it does not exist."""
    try:
        return os.listdir(folder)
    except FileNotFoundError:
        return []


def clean_split_staging(layout: OutputLayout, storage_options: dict | None = None) -> int:
    """Remove this split's staged leftovers: local ``_tmp`` (and older versions' ``stats/*.tmp``),
    or incomplete multipart uploads of its files on S3. Returns how many."""
    fs, _ = filesystem(layout.root, storage_options)
    if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        tmp, stats = fs._strip_protocol(layout.tmp_dir), fs._strip_protocol(layout.stats_dir)
        report = tuple(f"{name}." for name in layout.report_files)
        n = _remove([os.path.join(tmp, f) for f in list_names(tmp) if layout.owns(f) or f.startswith(report)])
        n += _remove([os.path.join(stats, f) for f in list_names(stats) if layout.owns(f) and f.endswith(".tmp")])
    else:
        n = _abort_uploads(fs, layout)
    if n:
        log.warning("removed %d staged files of split %s left by an earlier run", n, layout.split)
    return n


def _abort_uploads(fs, layout: OutputLayout) -> int:
    """Abort incomplete multipart uploads of this split's data/stats objects (S3 only)."""
    if not hasattr(fs, "call_s3"):
        return 0
    n = 0
    for folder in (layout.data_dir, layout.stats_dir):
        bucket, key, _ = fs.split_path(folder)
        prefix = f"{key}/{layout.split}-"
        resp = fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=prefix)
        for up in resp.get("Uploads", []):
            if layout.owns(up["Key"].rsplit("/", 1)[-1]):
                fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=up["Key"], UploadId=up["UploadId"])
                n += 1
    return n


def clean_shared_staging(layout: OutputLayout, storage_options: dict | None = None) -> int:
    """Remove staged copies of ``pretok.json`` and the card (hold the manifest lease)."""
    fs, root = filesystem(layout.root, storage_options)
    if "file" not in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        return 0
    tmp = fs._strip_protocol(layout.tmp_dir)
    shared = (f"{MANIFEST}.", f"{CARD}.")
    paths = [os.path.join(tmp, f) for f in list_names(tmp) if f.startswith(shared) and f.endswith(".tmp")]
    paths += [os.path.join(root, f) for f in list_names(root) if f.startswith(shared) and f.endswith(".tmp")]
    return _remove(paths)


def clean_worker_temp(layout: OutputLayout, run_id: str) -> int:
    """Remove this split's temp files in this node's temp dir left by earlier runs' actors."""
    folder, prefix = tempfile.gettempdir(), worker_temp_prefix(layout.root)
    stale = []
    for f in list_names(folder):
        rest = f[len(prefix):] if f.startswith(prefix) else ""
        if rest and layout.owns(rest) and layout.staged_tag(rest) != run_id:
            stale.append(os.path.join(folder, f))
    return _remove(stale)
