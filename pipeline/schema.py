"""Arrow schema, Hugging Face Features and metadata of the output token shards."""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from datasets import ClassLabel, Features, List, Value

from .records import KeptField


@dataclass(frozen=True)
class TokenSchema:
    num_tokens: int
    num_views: int
    has_labels: bool = False
    label_names: tuple[str, ...] | None = None
    has_captions: bool = False
    has_token_counts: bool = False   # the int32 ``num_tokens_needed`` column (ordered tokenizers)
    kept: tuple[KeptField, ...] = ()  # passthrough columns (``--keep``), after ``height``

    def features(self) -> Features:
        cols = {
            "key": Value("string"),
            "tokens": List(List(Value("uint16"), length=self.num_tokens), length=self.num_views),
        }
        if self.has_token_counts:
            cols["num_tokens_needed"] = Value("int32")
        if self.has_labels:
            cols["label"] = ClassLabel(names=list(self.label_names)) if self.label_names else Value("int64")
        if self.has_captions:
            cols["caption"] = Value("string")
        cols["width"] = Value("int32")
        cols["height"] = Value("int32")
        cols.update(Features.from_dict({f.column: f.feature for f in self.kept}))
        return Features(cols)

    def kept_types(self) -> dict[str, pa.DataType]:
        """Output column -> Arrow type of each kept column."""
        schema = self.features().arrow_schema
        return {f.column: schema.field(f.column).type for f in self.kept}

    def arrow_schema(self, manifest: dict) -> pa.Schema:
        """The Features' own Arrow schema (so ``datasets`` restores them exactly: label is stored
        as ClassLabel's int64) with ``huggingface`` and ``pretok`` metadata."""
        schema = self.features().arrow_schema
        return schema.with_metadata({**schema.metadata, b"pretok": json.dumps(manifest, sort_keys=True).encode()})

    def record_batch(self, schema: pa.Schema, rows: list, tokens: np.ndarray) -> pa.RecordBatch:
        """DecodedImage rows (``num_tokens_needed`` read only with token counts; kept values in
        ``extra`` by output column, as ``KeptValues`` made them) + uint16 tokens [B,V,N]."""
        b = len(rows)
        if tokens.shape != (b, self.num_views, self.num_tokens) or tokens.dtype != np.uint16:
            raise ValueError(f"tokens must be uint16 {(b, self.num_views, self.num_tokens)}, got {tokens.dtype} {tokens.shape}")
        flat = pa.array(tokens.reshape(-1), type=pa.uint16())
        inner = pa.FixedSizeListArray.from_arrays(flat, self.num_tokens)
        cols = {
            "key": pa.array([r.key for r in rows], pa.string()),
            "tokens": pa.FixedSizeListArray.from_arrays(inner, self.num_views),
        }
        if self.has_token_counts:
            cols["num_tokens_needed"] = pa.array([r.num_tokens_needed for r in rows], pa.int32())
        if self.has_labels:
            cols["label"] = pa.array([r.label for r in rows], pa.int64())
        if self.has_captions:
            cols["caption"] = pa.array([r.caption for r in rows], pa.string())
        cols["width"] = pa.array([r.width for r in rows], pa.int32())
        cols["height"] = pa.array([r.height for r in rows], pa.int32())
        for f in self.kept:
            cols[f.column] = pa.array([r.extra.get(f.column) for r in rows], schema.field(f.column).type)
        return pa.RecordBatch.from_arrays([cols[f.name] for f in schema], schema=schema)
