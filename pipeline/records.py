"""Data contracts between the pipeline stages (reader -> decoder -> encoder -> writer)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

FORMATS = ("webdataset", "parquet", "imagefolder")


@dataclass(frozen=True)
class InputShard:
    """One unit of work: becomes exactly one output Parquet file."""

    index: int                     # position in the sorted shard list of the source
    url: str                       # tar / parquet file URL; for imagefolder the folder root
    format: str                    # one of FORMATS
    size: int | None = None        # bytes when known (tar/parquet file size)
    members: tuple[str, ...] = ()  # imagefolder: image paths relative to ``url``, in order


@dataclass(frozen=True)
class KeptField:
    """A passthrough column chosen with ``--keep``: its source, output name and fixed type."""

    source: str                   # webdataset: field of the ``.json`` sidecar; Parquet: source column
    column: str                   # output column (``src_`` + source when that is one of our columns)
    feature: dict                 # Hugging Face feature, datasets' dict form ({"dtype": ..., "_type": "Value"})
    json_type: str | None = None  # webdataset: bool | int64 | float64 | string | json; None for Parquet


@dataclass(frozen=True)
class SourceListing:
    """What the driver learns about an input before any image is read."""

    url: str                      # the input as given (several INPUTs joined by spaces)
    format: str
    shards: tuple[InputShard, ...]  # present shards; index = position among all named shards
    label_names: tuple[str, ...] | None = None  # ClassLabel names when known
    has_labels: bool = False
    has_captions: bool = False
    kept: tuple[KeptField, ...] = ()
    missing: tuple[InputShard, ...] = ()  # named by the input but absent (``allow_missing``)

    @property
    def num_shards(self) -> int:
        """Shards the input names, present or missing: the ``-of-{n}`` of every output name."""
        return len(self.shards) + len(self.missing)


@dataclass
class Record:
    """One input sample as read from a shard (image still encoded)."""

    key: str
    image: bytes | None                 # None when the sample has no image member
    label: int | None = None
    caption: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    skip_reason: str | None = None      # set by a reader that refused the image (e.g. too large)


@dataclass
class DecodedImage:
    """A record after decode + transform, ready for the encoder."""

    key: str
    views: Any                     # numpy uint8 [V,3,R,R]
    width: int                     # original (upright) size
    height: int
    label: int | None = None
    caption: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    num_tokens_needed: int | None = None  # set only when the job computes token counts


@dataclass(frozen=True)
class SkippedRecord:
    """A record that produced no row, with the reason recorded in the shard stats."""

    key: str
    reason: str
