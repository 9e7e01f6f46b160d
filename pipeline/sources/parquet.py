"""Streaming reader for Parquet shards with an image column (Hugging Face ``Image`` layout)."""
from __future__ import annotations

import json
import posixpath
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from datasets import Features

from pipeline.records import KeptField, Record
from pipeline.sources.passthrough import column_names
from pipeline.sources.storage import BadShard, SourceError, open_input

HF_METADATA_KEY = b"huggingface"
LABEL_COLUMN = "label"
CAPTION_COLUMNS = ("caption", "text")
BATCH_ROWS = 16


@dataclass(frozen=True)
class ParquetColumns:
    """How one Parquet schema maps onto ``Record`` fields."""

    image: str
    image_is_struct: bool                    # {bytes, path} struct, else plain binary
    label: str | None
    caption: str | None
    label_names: tuple[str, ...] | None      # ClassLabel names from the ``huggingface`` metadata
    schema: pa.Schema                        # the shard's Arrow schema, with its metadata

    def read(self, keep: Sequence[str] = ()) -> list[str]:
        """The columns a reader needs: image, label, caption and those of ``keep`` this shard has."""
        wanted = [self.image, self.label, self.caption, *keep]
        return list(dict.fromkeys(c for c in wanted if c is not None and c in self.schema.names))

    def kept_fields(self, keep: dict[str, str | None], where: str) -> tuple[KeptField, ...]:
        """``--keep`` columns with their Features: the ``huggingface`` metadata's feature when it
        matches the column's Arrow type, else the one ``datasets`` derives from that type."""
        typed = [name for name, json_type in keep.items() if json_type]
        if typed:
            raise SourceError(f"--keep {','.join(typed)}: a :TYPE applies to .json sidecar fields; "
                              "Parquet columns keep their own type")
        unknown = [name for name in keep if name not in self.schema.names]
        if unknown:
            raise SourceError(f"--keep {','.join(unknown)}: no such column in {where} (columns: {', '.join(self.schema.names)})")
        fields = pa.schema([self.schema.field(name) for name in keep], metadata=self.schema.metadata)
        try:
            features = Features.from_arrow_schema(fields).to_dict()
        except (ValueError, TypeError, NotImplementedError) as e:
            raise SourceError(f"--keep {','.join(keep)}: a column type of {where} has no datasets feature: {e}") from None
        return tuple(KeptField(source=n, column=c, feature=features[n]) for n, c in zip(keep, column_names(list(keep))))


def _hf_features(schema: pa.Schema) -> dict:
    raw = (schema.metadata or {}).get(HF_METADATA_KEY)
    if not raw:
        return {}
    features = json.loads(raw).get("info", {}).get("features", {})
    return features if isinstance(features, dict) else {}


def _is_binary(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t)


def _is_string(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def columns(schema: pa.Schema) -> ParquetColumns:
    """The image/label/caption columns of ``schema``; ``BadShard`` when there is no image column.

    The image column is the first with the Hugging Face ``Image`` feature, else ``image``.
    """
    features = _hf_features(schema)
    hf_images = [n for n, f in features.items() if isinstance(f, dict) and f.get("_type") == "Image"]
    image = next((n for n in hf_images if n in schema.names), "image")
    if image not in schema.names:
        raise BadShard(f"no image column (looked for {image!r}) in columns {schema.names}")
    image_type = schema.field(image).type
    is_struct = pa.types.is_struct(image_type)
    if not (_is_binary(image_type) or (is_struct and image_type.get_field_index("bytes") >= 0)):
        raise BadShard(f"image column {image!r} must be binary or struct{{bytes, path}}, not {image_type}")
    label = LABEL_COLUMN if LABEL_COLUMN in schema.names else None
    if label and not pa.types.is_integer(schema.field(label).type):
        raise BadShard(f"label column must be integer, not {schema.field(label).type}")
    caption = next((c for c in CAPTION_COLUMNS if c in schema.names and _is_string(schema.field(c).type)), None)
    label_feature = features.get(LABEL_COLUMN, {}) if label else {}
    names = label_feature.get("names") if label_feature.get("_type") == "ClassLabel" else None
    return ParquetColumns(
        image=image,
        image_is_struct=is_struct,
        label=label,
        caption=caption,
        label_names=tuple(names) if names else None,
        schema=schema,
    )


def read_columns(fs: fsspec.AbstractFileSystem, path: str) -> ParquetColumns:
    """Column mapping of one shard, from its footer only."""
    with open_input(fs, path) as f:
        return columns(pq.ParquetFile(f).schema_arrow)


def read_parquet(fs: fsspec.AbstractFileSystem, path: str, keep: Sequence[str] = ()) -> Iterator[Record]:
    """Records in row order, ``BATCH_ROWS`` at a time: one row group is read at a time.

    Only the image, label and caption columns and the ``keep`` columns are read; ``Record.extra``
    holds the ``keep`` columns this shard has. Key: the image ``path`` when present and
    non-empty, else ``"{shard stem}:{row}"``.
    """
    stem = posixpath.basename(path).removesuffix(".parquet")
    row = 0
    with open_input(fs, path) as f:
        pf = pq.ParquetFile(f, pre_buffer=False)  # pre-buffering would fetch every row group first
        cols = columns(pf.schema_arrow)
        read = cols.read(keep)
        extra = [c for c in read if c in keep]
        for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=read):
            data = {name: batch.column(name).to_pylist() for name in read}
            for i in range(batch.num_rows):
                value = data[cols.image][i]
                if cols.image_is_struct:
                    image, name = (value["bytes"], value.get("path")) if value else (None, None)
                else:
                    image, name = value, None
                yield Record(
                    key=name or f"{stem}:{row}",
                    image=image,
                    label=data[cols.label][i] if cols.label else None,
                    caption=data[cols.caption][i] if cols.caption else None,
                    extra={c: data[c][i] for c in extra},
                )
                row += 1
