"""Where everything lives in an output dataset (``OUT/``)."""
from __future__ import annotations

from dataclasses import dataclass

import fsspec

MANIFEST = "pretok.json"
CARD = "README.md"


@dataclass(frozen=True)
class OutputLayout:
    """Paths of one output dataset; ``root`` is an fsspec URL or local path."""

    root: str
    split: str
    num_shards: int

    def __post_init__(self) -> None:
        if not self.split.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"split must be alphanumeric (with - or _), not {self.split!r}")

    def _join(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def shard_name(self, index: int) -> str:
        return f"{self.split}-{index:05d}-of-{self.num_shards:05d}"

    def data_path(self, index: int) -> str:
        return self._join("data", self.shard_name(index) + ".parquet")

    def stats_path(self, index: int) -> str:
        return self._join("stats", self.shard_name(index) + ".json")

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

    @property
    def data_glob(self) -> str:
        return f"data/{self.split}-*.parquet"


def filesystem(url: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``url`` and the path within it."""
    return fsspec.core.url_to_fs(url, **(storage_options or {}))
