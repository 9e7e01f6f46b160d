"""Writes one output shard: Parquet rows as they are encoded, then an atomic commit.

Nothing half-written is ever visible under ``data/`` or ``stats/``: a local shard (and every local
JSON file) is staged in ``OUT/_tmp`` and renamed into place; a remote one is staged in a local temp
file and uploaded in one put (an S3 object appears only when its upload completes). Staged names
carry the shard name and run id, so the next run of the split can clean what a killed one left
(``pipeline.staging``). Tokens are dictionary-encoded and zstd-compressed: close to N*log2(C)/8
bytes per view.
"""
from __future__ import annotations

import os
import tempfile
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .layout import OutputLayout, filesystem
from .ledger import ShardStats, file_sha256
from .schema import TokenSchema
from .staging import worker_temp_prefix

ROW_GROUP_ROWS = 8192


def _is_local(fs) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def write_text_atomic(url: str, text: str, storage_options: dict | None = None, staging_dir: str | None = None) -> None:
    """Replace ``url`` with ``text`` so readers see the old or the new content, never a part."""
    write_bytes_atomic(url, text.encode(), storage_options, staging_dir)


def write_bytes_atomic(url: str, data: bytes, storage_options: dict | None = None, staging_dir: str | None = None) -> None:
    """Replace ``url`` with ``data`` so readers see the old or the new content, never a part.

    Locally the bytes are staged in ``staging_dir`` (default: beside ``url``; same filesystem)."""
    fs, path = filesystem(url, storage_options)
    if _is_local(fs):
        folder = fs._strip_protocol(staging_dir) if staging_dir else os.path.dirname(path)
        os.makedirs(folder, exist_ok=True)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = os.path.join(folder, f"{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)


class ShardWriter:
    """Streams record batches of one shard into a staged Parquet file; ``commit`` publishes it."""

    def __init__(
        self,
        layout: OutputLayout,
        index: int,
        schema: TokenSchema,
        manifest: dict,
        storage_options: dict | None = None,
        run_id: str = "",
    ):
        self.layout, self.index, self.schema = layout, index, schema
        self.storage_options = storage_options
        self.fs, _ = filesystem(layout.root, storage_options)
        self.arrow_schema = schema.arrow_schema(manifest)
        prefix = f"{layout.shard_name(index)}.{run_id or 'norun'}."
        if _is_local(self.fs):
            staging = self.fs._strip_protocol(layout.tmp_dir)
            os.makedirs(staging, exist_ok=True)
        else:
            staging, prefix = None, worker_temp_prefix(layout.root) + prefix
        fd, self.tmp_path = tempfile.mkstemp(prefix=prefix, suffix=".parquet", dir=staging)
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
        """Publish the data file, then its stats (which mark the shard done).

        The stats get the data file's size, sha256 and (object stores) ETag."""
        self._flush()
        self._writer.close()
        if stats.rows_written != self.rows:
            raise ValueError(f"stats say {stats.rows_written} rows, writer wrote {self.rows}")
        stats.data_bytes = os.path.getsize(self.tmp_path)
        with open(self.tmp_path, "rb") as f:
            stats.data_sha256 = file_sha256(f)
        _, data_path = filesystem(self.layout.data_path(self.index), self.storage_options)
        if _is_local(self.fs):
            os.makedirs(os.path.dirname(data_path), exist_ok=True)
            os.replace(self.tmp_path, data_path)
        else:
            self.fs.put_file(self.tmp_path, data_path)
            os.unlink(self.tmp_path)
            stats.data_etag = self.fs.info(data_path).get("ETag")
        write_text_atomic(self.layout.stats_path(self.index), stats.to_json(), self.storage_options,
                          self.layout.tmp_dir)
        return stats

    def abort(self) -> None:
        """Drop the staged file (a failed attempt leaves nothing behind)."""
        try:
            self._writer.close()
        finally:
            if os.path.exists(self.tmp_path):
                os.unlink(self.tmp_path)
