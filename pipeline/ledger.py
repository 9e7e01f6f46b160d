"""Per-shard stats files and the resume ledger built from them.

A shard is done iff its stats file exists, names the current run fingerprint, and the data file
it describes exists with the recorded size (and ETag, where the store gives one; and sha256 with
``verify``). Stats are written after the data file, so a crash between the two leaves a shard that
is simply redone (the rewrite is byte-identical).
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import asdict, dataclass, field, fields

from .layout import OutputLayout, filesystem

log = logging.getLogger("pretok")
_HASH_BLOCK = 1 << 20


def redact_url(url: str) -> str:
    """Drop any ``user:password@`` from a URL before it is logged or stored."""
    return re.sub(r"(?<=://)[^/@]*@", "", url)


@dataclass
class ShardStats:
    index: int
    shard: str
    input_url: str
    input_bytes: int | None
    rows_in: int
    rows_written: int
    skipped: list[dict] = field(default_factory=list)  # [{"key": ..., "reason": ...}]
    data_bytes: int = 0
    run_fingerprint: str = ""
    seconds: float = 0.0
    worker: dict = field(default_factory=dict)       # node id, GPU ids, attempt
    kept_nulls: dict = field(default_factory=dict)   # kept column -> {missing|wrong_type|invalid_json: n}
    run_id: str = ""                                 # the run that wrote it ("" before leases)
    data_sha256: str | None = None                   # of the data file (None before hashes)
    data_etag: str | None = None                     # object stores: the data object's ETag
    batch_size: int | None = None                    # tokens are byte-identical for equal batch size
    device_type: str = ""                            # and device type ("cpu", "NVIDIA H100 80GB HBM3")
    started_at: float | None = None                  # unix time the shard's attempt started
    finished_at: float | None = None                 # ... and was ready to commit
    qa_every: int = 0                                # QA (pipeline.qa): every K-th written row; 0 = off
    qa_keys: list[str] = field(default_factory=list)   # keys of the rows checked
    qa_psnr: list[float] = field(default_factory=list)  # their PSNR in dB, same order
    qa_unavailable: str | None = None                # why the tokenizer could not decode
    qa_thumbnails: int = 0                           # pairs in stats/{shard}.qa.png
    qa_seconds: float = 0.0                          # decode time spent on QA

    def __post_init__(self) -> None:
        if self.rows_in != self.rows_written + len(self.skipped):
            raise ValueError(
                f"shard {self.shard}: rows in {self.rows_in} != written {self.rows_written} + skipped {len(self.skipped)}"
            )

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> "ShardStats":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in json.loads(text).items() if k in known})


def file_sha256(f) -> str:
    """sha256 hex of an open binary file, read in blocks."""
    h = hashlib.sha256()
    while block := f.read(_HASH_BLOCK):
        h.update(block)
    return h.hexdigest()


def _data_problem(stats: ShardStats, entry: dict | None) -> str | None:
    """Why the listed data file ``entry`` (fsspec info) is not the one ``stats`` describes."""
    if entry is None:
        return "data file missing"
    if entry.get("size") != stats.data_bytes:
        return f"data file has {entry.get('size')} bytes, stats say {stats.data_bytes}"
    etag = entry.get("ETag")
    if stats.data_etag and etag and etag != stats.data_etag:
        return f"data file ETag {etag} differs from the recorded {stats.data_etag}"
    return None


def check_commit(layout: OutputLayout, stats: ShardStats, storage_options: dict | None = None) -> str | None:
    """What is wrong with a shard an actor reports committed, as seen from here; None when its
    data file (recorded size, ETag) and stats file are both visible."""
    fs, _ = filesystem(layout.root, storage_options)
    data, stats_path = layout.data_path(stats.index), layout.stats_path(stats.index)
    for path in (data, stats_path):
        fs.invalidate_cache(path)
    try:
        entry = fs.info(data)
    except FileNotFoundError:
        entry = None
    problem = _data_problem(stats, entry)
    if problem is None and not fs.exists(stats_path):
        problem = "stats file missing"
    return problem


@dataclass
class Ledger:

    """What is already done in an output dataset."""

    done: dict[int, ShardStats]
    redo: dict[int, str] = field(default_factory=dict)  # shard index -> why its stats do not count

    @classmethod
    def read(cls, layout: OutputLayout, run_fingerprint: str, storage_options: dict | None = None,
             verify: bool = False) -> "Ledger":
        """Done shards of ``layout.split``. Cheap checks (listing: size, ETag); ``verify`` also
        hashes every data file against its recorded sha256."""
        fs, _ = filesystem(layout.root, storage_options)
        data_files = _listing(fs, layout.data_dir)
        stats_files = [p for p in _listing(fs, layout.stats_dir) if p.endswith(".json")
                       and layout.owns(p.rsplit("/", 1)[-1])]
        ledger = cls({})
        if not stats_files:
            return ledger
        blobs = fs.cat(stats_files)  # concurrent on object stores
        unhashed = 0
        for path in stats_files:
            try:
                stats = ShardStats.from_json(blobs[path])
            except (ValueError, TypeError):
                continue  # unreadable stats: the shard is redone
            if stats.run_fingerprint != run_fingerprint or stats.shard != layout.shard_name(stats.index):
                continue
            data = fs._strip_protocol(layout.data_path(stats.index))
            problem = _data_problem(stats, data_files.get(data))
            if problem is None and verify:
                if stats.data_sha256 is None:
                    unhashed += 1
                else:
                    with fs.open(data, "rb") as f:
                        if file_sha256(f) != stats.data_sha256:
                            problem = "data file sha256 differs from the recorded one"
            if problem is None:
                ledger.done[stats.index] = stats
            else:
                ledger.redo[stats.index] = problem
        if unhashed:
            log.warning("%d done shards of split %s have no recorded sha256 (written by an earlier version): "
                        "checked by size only", unhashed, layout.split)
        return ledger


def _listing(fs, url: str) -> dict[str, dict]:
    """path -> fsspec info for the files directly under ``url`` (empty when it does not exist)."""
    fs.invalidate_cache(url)
    try:
        entries = fs.ls(url, detail=True)
    except FileNotFoundError:
        return {}
    return {fs._strip_protocol(e["name"]): e for e in entries if e.get("type") == "file"}
