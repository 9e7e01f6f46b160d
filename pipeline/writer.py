"""Writes one output shard: Parquet rows as they are encoded, then an atomic commit.

Nothing half-written is ever visible under ``data/`` or ``stats/``: a local shard is staged in
``OUT/_tmp`` and renamed into place; a remote one is staged in a local temp file and uploaded in
one put (an S3 object appears only when its upload completes). Tokens are dictionary-encoded and
zstd-compressed: close to N*log2(C)/8 bytes per view.
"""
from __future__ import annotations

import os
import tempfile
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .layout import OutputLayout, filesystem
from .ledger import ShardStats
from .schema import TokenSchema

ROW_GROUP_ROWS = 8192


def _is_local(fs) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def write_text_atomic(url: str, text: str, storage_options: dict | None = None) -> None:
    """Replace ``url`` with ``text`` so readers see the old or the new content, never a part."""
    fs, path = filesystem(url, storage_options)
    if _is_local(fs):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, text.encode())


class ShardWriter:
    """Streams record batches of one shard into a staged Parquet file; ``commit`` publishes it."""

    def __init__(
        self,
        layout: OutputLayout,
        index: int,
        schema: TokenSchema,
        manifest: dict,
        storage_options: dict | None = None,
    ):
        self.layout, self.index, self.schema = layout, index, schema
        self.storage_options = storage_options
        self.fs, _ = filesystem(layout.root, storage_options)
        self.arrow_schema = schema.arrow_schema(manifest)
        if _is_local(self.fs):
            staging = self.fs._strip_protocol(layout.tmp_dir)
            os.makedirs(staging, exist_ok=True)
        else:
            staging = None
        fd, self.tmp_path = tempfile.mkstemp(prefix=layout.shard_name(index) + ".", suffix=".parquet", dir=staging)
        os.close(fd)
        self._writer = pq.ParquetWriter(
            self.tmp_path, self.arrow_schema, compression="zstd", use_dictionary=True, write_statistics=["key"]
        )
        self._pending: list[pa.RecordBatch] = []
        self._pending_rows = 0
        self.rows = 0

    def write(self, rows: list, tokens: np.ndarray) -> None:
        """Append decoded rows with their uint16 tokens [B,V,N]."""
        if not rows:
            return
        self._pending.append(self.schema.record_batch(self.arrow_schema, rows, tokens))
        self._pending_rows += len(rows)
        self.rows += len(rows)
        if self._pending_rows >= ROW_GROUP_ROWS:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            self._writer.write_table(pa.Table.from_batches(self._pending), row_group_size=ROW_GROUP_ROWS)
            self._pending, self._pending_rows = [], 0

    def commit(self, stats: ShardStats) -> ShardStats:
        """Publish the data file, then its stats (which mark the shard done)."""
        self._flush()
        self._writer.close()
        if stats.rows_written != self.rows:
            raise ValueError(f"stats say {stats.rows_written} rows, writer wrote {self.rows}")
        stats.data_bytes = os.path.getsize(self.tmp_path)
        _, data_path = filesystem(self.layout.data_path(self.index), self.storage_options)
        if _is_local(self.fs):
            os.makedirs(os.path.dirname(data_path), exist_ok=True)
            os.replace(self.tmp_path, data_path)
        else:
            self.fs.put_file(self.tmp_path, data_path)
            os.unlink(self.tmp_path)
        write_text_atomic(self.layout.stats_path(self.index), stats.to_json(), self.storage_options)
        return stats

    def abort(self) -> None:
        """Drop the staged file (a failed attempt leaves nothing behind)."""
        try:
            self._writer.close()
        finally:
            if os.path.exists(self.tmp_path):
                os.unlink(self.tmp_path)
