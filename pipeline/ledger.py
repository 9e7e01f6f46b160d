"""Per-shard stats files and the resume ledger built from them.

A shard is done iff its stats file exists, names the current run fingerprint, and the data file
it describes exists with the recorded size. Stats are written after the data file, so a crash
between the two leaves a shard that is simply redone (the rewrite is byte-identical).
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field

from .layout import OutputLayout, filesystem


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

    def __post_init__(self) -> None:
        if self.rows_in != self.rows_written + len(self.skipped):
            raise ValueError(
                f"shard {self.shard}: rows in {self.rows_in} != written {self.rows_written} + skipped {len(self.skipped)}"
            )

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> "ShardStats":
        return cls(**json.loads(text))


@dataclass
class Ledger:
    """What is already done in an output dataset."""

    done: dict[int, ShardStats]

    @classmethod
    def read(cls, layout: OutputLayout, run_fingerprint: str, storage_options: dict | None = None) -> "Ledger":
        fs, _ = filesystem(layout.root, storage_options)
        sizes = _sizes(fs, layout.data_dir)
        stats_files = [p for p in _sizes(fs, layout.stats_dir) if p.endswith(".json")]
        done: dict[int, ShardStats] = {}
        if not stats_files:
            return cls(done)
        blobs = fs.cat(stats_files)  # concurrent on object stores
        for path in stats_files:
            try:
                stats = ShardStats.from_json(blobs[path])
            except (ValueError, TypeError):
                continue  # unreadable stats: the shard is redone
            data = fs._strip_protocol(layout.data_path(stats.index))
            if (
                stats.run_fingerprint == run_fingerprint
                and stats.shard == layout.shard_name(stats.index)
                and sizes.get(data) == stats.data_bytes
            ):
                done[stats.index] = stats
        return cls(done)


def _sizes(fs, url: str) -> dict[str, int]:
    """path -> size for the files directly under ``url`` (empty when it does not exist)."""
    fs.invalidate_cache(url)
    try:
        entries = fs.ls(url, detail=True)
    except FileNotFoundError:
        return {}
    return {fs._strip_protocol(e["name"]): e["size"] for e in entries if e.get("type") == "file"}
