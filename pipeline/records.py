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
class SourceListing:
    """What the driver learns about an input before any image is read."""

    url: str
    format: str
    shards: tuple[InputShard, ...]
    label_names: tuple[str, ...] | None = None  # ClassLabel names when known
    has_labels: bool = False
    has_captions: bool = False


@dataclass
class Record:
    """One input sample as read from a shard (image still encoded)."""

    key: str
    image: bytes | None                 # None when the sample has no image member
    label: int | None = None
    caption: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


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
