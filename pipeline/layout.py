"""Where everything lives in an output dataset (``OUT/``)."""
from __future__ import annotations

import re
from dataclasses import dataclass

import fsspec

MANIFEST = "pretok.json"
CARD = "README.md"
REPORT_PLOTS = ("throughput", "skips", "codebook", "classes", "qa-psnr", "qa-sheet")  # pipeline.report
SPLIT_NAME = re.compile(r"^\w+(\.\w+)*$")  # the split names ``datasets`` accepts


class OutputError(OSError):
    """The output cannot be read or written; the message names its URL, never a credential."""


@dataclass(frozen=True)
class OutputLayout:
    """Paths of one output dataset; ``root`` is an fsspec URL or local path."""

    root: str
    split: str
    num_shards: int

    def __post_init__(self) -> None:
        if not SPLIT_NAME.match(self.split):
            raise ValueError(f"split must be letters, digits and _ (dot-separated parts allowed, as in "
                             f"datasets), not {self.split!r}")

    def _join(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def shard_name(self, index: int) -> str:
        return f"{self.split}-{index:05d}-of-{self.num_shards:05d}"

    def data_path(self, index: int) -> str:
        return self._join("data", self.shard_name(index) + ".parquet")

    def stats_path(self, index: int) -> str:
        return self._join("stats", self.shard_name(index) + ".json")

    def qa_path(self, index: int) -> str:
        """The shard's QA thumbnails (``pipeline.qa``), beside its stats so they share its life cycle."""
        return self._join("stats", self.shard_name(index) + ".qa.png")

    @property
    def report_dir(self) -> str:
        return self._join("report")

    @property
    def report_files(self) -> list[str]:
        """Names under ``report/`` of this split's run report, PNGs first."""
        return [f"{self.split}-{p}.png" for p in REPORT_PLOTS] + [f"{self.split}-report.json"]

    @property
    def data_dir(self) -> str:
        return self._join("data")

    @property
    def stats_dir(self) -> str:
        return self._join("stats")

    @property
    def tmp_dir(self) -> str:
        """Staging area for local commits (same filesystem, so rename is atomic); never globbed."""
        return self._join("_tmp")

    @property
    def manifest_path(self) -> str:
        return self._join(MANIFEST)

    @property
    def card_path(self) -> str:
        return self._join(CARD)

    def owns(self, name: str) -> bool:
        """True for a file name (data, stats or staged) that belongs to this split's shards."""
        return self.staged_tag(name) is not None

    def staged_tag(self, name: str) -> str | None:
        """For a file name of this split's shards, the dot-separated part after the shard name
        (a staged file's run id); None for another split's file."""
        m = re.match(rf"{re.escape(self.split)}-\d+-of-\d+\.([^.]*)", name)
        return m.group(1) if m else None

    @property
    def data_glob(self) -> str:
        return f"data/{self.split}-*.parquet"


def filesystem(url: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``url`` and the path within it."""
    return fsspec.core.url_to_fs(url, **(storage_options or {}))
