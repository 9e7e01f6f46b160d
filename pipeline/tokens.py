"""Reading pretokenized datasets: ``load_tokens`` (a ``datasets.Dataset``), ``TokenLoader`` and
``StreamLoader``.

Both loaders read the Parquet shards with pyarrow (no per-row access), keep one randomly chosen view
per row as a compact uint16 array, and yield shuffled int64 batches.

Work split, per epoch: the shard list is shuffled with ``(seed, epoch)`` (same order on every rank),
rank ``r`` takes shards ``r::world_size`` and DataLoader worker ``w`` of ``W`` takes ``w::W`` of
those. Every row is therefore yielded exactly once per epoch across ranks x workers. When shards do
not divide evenly (or differ in size) ranks get different row counts for that epoch; a step-based
loop that starts the next epoch when one ends handles this, an epoch-synchronous DDP loop would need
to cap its steps. Use at least ``world_size x num_workers`` shards, otherwise some workers idle; a
rank with no shard at all is an error.

``StreamLoader`` is the generator trainer's loader: its order is defined over ``S`` logical streams
and global batches, so the rows of global batch k are the same for every world size dividing ``S``,
and every rank has the same number of steps per epoch.
"""
from __future__ import annotations

import copy
import dataclasses
import json
from concurrent.futures import ThreadPoolExecutor
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch.utils.data import IterableDataset, get_worker_info

MANIFEST = "pretok.json"
# Explicit, because datasets 5.2 otherwise uses the first row group's row count, which is 0 in a
# shard written from an empty table (all images skipped) and fails the whole load.
_READ_BATCH_ROWS = 8192
_SHARD = re.compile(r"-(\d{5})-of-(\d{5})\.parquet$")


@dataclass(frozen=True)
class TokenFiles:
    """One split of an output dataset: its sorted shard URLs and ``pretok.json``."""

    root: str
    split: str
    files: tuple[str, ...]
    manifest: dict = field(repr=False)
    storage_options: dict | None = field(default=None, repr=False)

    @classmethod
    def open(cls, out: str, split: str = "train", storage_options: dict | None = None) -> "TokenFiles":
        fs, root = fsspec.core.url_to_fs(out, **(storage_options or {}))
        manifest_path = f"{root.rstrip('/')}/{MANIFEST}"
        if not fs.exists(manifest_path):
            raise FileNotFoundError(f"{out} has no {MANIFEST}: not a pretok output dataset")
        manifest = json.loads(fs.cat_file(manifest_path))
        paths = sorted(fs.glob(f"{root.rstrip('/')}/data/{split}-*.parquet"))
        if not paths:
            raise FileNotFoundError(f"{out} has no shards for split {split!r} (data/{split}-*.parquet)")
        expected = {int(m.group(2)) for m in map(_SHARD.search, paths) if m}
        if len(expected) == 1 and len(paths) < (n := expected.pop()):
            warnings.warn(f"{out} split {split!r} is incomplete: {len(paths)} of {n} shards", stacklevel=2)
        files = tuple(fs.unstrip_protocol(p) if "://" in out else p for p in paths)
        return cls(out, split, files, manifest, storage_options)

    @property
    def tokenizer(self) -> dict:
        return self.manifest["tokenizer"]

    @property
    def num_tokens(self) -> int:
        return int(self.tokenizer["num_tokens"])

    @property
    def codebook_size(self) -> int:
        return int(self.tokenizer["codebook_size"])

    @property
    def label_names(self) -> list[str] | None:
        return self.manifest.get("label_names")

    def schema(self) -> pa.Schema:
        """Arrow schema (with metadata) of the first shard."""
        fs, path = fsspec.core.url_to_fs(self.files[0], **(self.storage_options or {}))
        with fs.open(path, "rb") as f:
            return pq.read_schema(f)

    def features(self):
        """``datasets.Features`` stored in the shards' ``huggingface`` schema metadata."""
        from datasets import Features

        meta = self.schema().metadata or {}
        if b"huggingface" not in meta:
            raise ValueError(f"{self.files[0]} has no 'huggingface' schema metadata")
        return Features.from_dict(json.loads(meta[b"huggingface"])["info"]["features"])

    def check_max_tokens(self, max_tokens: int | None) -> int:
        """Token count to keep per view. A prefix is only meaningful for ordered tokenizers
        (FlexTok); for TiTok every position matters, so truncating it is refused."""
        n = self.num_tokens
        if max_tokens is None or max_tokens == n:
            return n
        if not self.tokenizer.get("ordered", False):
            raise ValueError(
                f"max_tokens={max_tokens}: the {self.tokenizer.get('family')} tokenizer of {self.root} is not "
                "ordered (pretok.json tokenizer.ordered=false), so a token prefix is not a valid code"
            )
        if not 1 <= max_tokens <= n:
            raise ValueError(f"max_tokens must be in [1, {n}], not {max_tokens}")
        return max_tokens

    def row_counts(self) -> tuple[int, ...]:
        """Rows per shard, from the Parquet footers (read in parallel)."""
        def count(url: str) -> int:
            fs, path = fsspec.core.url_to_fs(url, **(self.storage_options or {}))
            with fs.open(path, "rb") as f:
                return pq.ParquetFile(f).metadata.num_rows
        with ThreadPoolExecutor(16) as pool:
            return tuple(pool.map(count, self.files))

    def subset(self, indices: Sequence[int]) -> "TokenFiles":
        """The same split restricted to the shards at ``indices`` (kept in URL order)."""
        return dataclasses.replace(self, files=tuple(self.files[i] for i in sorted(indices)))

    def max_label(self) -> int:
        """Largest label over all shards (reads only the label column)."""
        top = -1
        for url in self.files:
            largest = pc.max(_read_columns(url, ["label"], self.storage_options).column("label")).as_py()
            if largest is not None:
                top = max(top, int(largest))
        return top


def _read_columns(url: str, columns: list[str], storage_options: dict | None) -> pa.Table:
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    return pq.read_table(path, columns=columns, filesystem=fs)


def load_tokens(
    out: str,
    split: str = "train",
    storage_options: dict | None = None,
    max_tokens: int | None = None,
    cache_dir: str | None = None,
):
    """A split of an output dataset as a ``datasets.Dataset`` with its stored Features restored
    (``ClassLabel`` names, uint16 tokens [V][N]). Local path or fsspec URL (``s3://...``).

    ``max_tokens=k`` keeps the first k tokens of every view; only allowed when pretok.json says
    the tokenizer is ordered (FlexTok), otherwise ``ValueError``. Remote shards are downloaded
    into the ``datasets`` cache once; with ``HF_DATASETS_OFFLINE``/``HF_HUB_OFFLINE`` set and an
    empty cache that download is refused, and a ``RuntimeError`` says so.
    """
    from datasets import List, Value, load_dataset

    files = TokenFiles.open(out, split, storage_options)
    keep = files.check_max_tokens(max_tokens)
    features = files.features()
    try:
        ds = load_dataset(
            "parquet",
            data_files={split: list(files.files)},
            split=split,
            features=features,
            batch_size=_READ_BATCH_ROWS,
            storage_options=copy.deepcopy(storage_options),  # datasets adds an "hf" entry in place
            cache_dir=cache_dir,
        )
    except ConnectionError as e:  # huggingface_hub.errors.OfflineModeIsEnabled subclasses it
        if "Offline mode" not in str(e):
            raise
        raise RuntimeError(
            f"cannot read {out}: datasets offline mode (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE) blocks "
            "remote files that are not cached yet; unset it or copy the dataset locally"
        ) from e
    if keep == files.num_tokens:
        return ds
    views = features["tokens"].length
    features["tokens"] = List(List(Value("uint16"), length=keep), length=views)
    return ds.with_format("arrow").map(
        _truncate, batched=True, fn_kwargs={"keep": keep}, features=features, desc=f"first {keep} tokens"
    ).with_format(None)


def _truncate(batch: pa.Table, keep: int) -> pa.Table:
    tokens = tokens_array(batch.column("tokens"))[:, :, :keep]
    return batch.set_column(batch.schema.get_field_index("tokens"), "tokens", _tokens_arrow(tokens))


def tokens_array(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """fixed_size_list<fixed_size_list<uint16,N>,V> -> uint16 [rows,V,N] (zero-copy per chunk)."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    v = column.type.list_size
    n = column.type.value_type.list_size
    parts = [c.flatten().flatten().to_numpy().reshape(len(c), v, n) for c in chunks]
    if not parts:
        return np.empty((0, v, n), np.uint16)
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _tokens_arrow(tokens: np.ndarray) -> pa.FixedSizeListArray:
    rows, v, n = tokens.shape
    inner = pa.FixedSizeListArray.from_arrays(pa.array(tokens.reshape(-1), pa.uint16()), n)
    return pa.FixedSizeListArray.from_arrays(inner, v)


class TokenLoader(IterableDataset):
    """Shuffled batches ``(tokens int64 [B,N], labels int64 [B])`` from token shards.

    Use directly or as a ``torch.utils.data.DataLoader(loader, batch_size=None, num_workers=k)``.
    Call ``set_epoch(e)`` before each epoch (non-persistent workers): shard order, the per-row view
    and the row permutation all derive from ``(seed, epoch, rank, worker)``.

    Each worker reads its shards ``buffer_shards`` at a time (``None``: all of them), keeps one
    random view per row (and the first ``max_tokens`` tokens), permutes the buffer's rows and
    gathers batches with numpy. Rows left over at the end of a buffer start the next one, so every
    batch is full except possibly the worker's last one of the epoch (dropped with ``drop_last``).
    Memory per worker: buffer rows x N x 2 bytes.
    """

    def __init__(
        self,
        files: TokenFiles,
        batch_size: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        max_tokens: int | None = None,
        buffer_shards: int | None = None,
        drop_last: bool = False,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, not {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), not {rank}")
        if len(files.files) < world_size:
            raise ValueError(f"{len(files.files)} shards cannot feed {world_size} ranks (each needs one)")
        if buffer_shards is not None and buffer_shards < 1:
            raise ValueError(f"buffer_shards must be >= 1 or None, not {buffer_shards}")
        if "label" not in files.schema().names:
            raise ValueError(f"{files.root} has no label column; class-conditional training needs labels")
        self.files = files
        self.batch_size = batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.num_tokens = files.check_max_tokens(max_tokens)
        self.buffer_shards = buffer_shards
        self.drop_last = drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def shards_for(self, worker: int = 0, num_workers: int = 1) -> list[str]:
        """Shard URLs this rank's ``worker`` reads in the current epoch."""
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.files.files))
        mine = order[self.rank :: self.world_size][worker::num_workers]
        return [self.files.files[i] for i in mine]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        shards = self.shards_for(worker, num_workers)
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker, num_workers])
        step = self.buffer_shards or max(len(shards), 1)
        carry = (np.empty((0, self.num_tokens), np.uint16), np.empty(0, np.int64))
        for start in range(0, len(shards), step):
            tokens, labels = self._read_buffer(shards[start : start + step], rng)
            if len(carry[1]):
                tokens, labels = np.concatenate([carry[0], tokens]), np.concatenate([carry[1], labels])
            order = rng.permutation(len(labels))
            full = len(order) - len(order) % self.batch_size
            for i in range(0, full, self.batch_size):
                yield self._batch(tokens, labels, order[i : i + self.batch_size])
            rest = order[full:]
            carry = (tokens[rest], labels[rest])
        if len(carry[1]) and not self.drop_last:
            yield self._batch(*carry, np.arange(len(carry[1])))

    def _read_buffer(self, shards: Sequence[str], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """One random view per row, first ``num_tokens`` tokens: uint16 [R,N], int64 [R]."""
        tokens, labels = [], []
        for url in shards:
            table = _read_columns(url, ["tokens", "label"], self.files.storage_options)
            views = tokens_array(table.column("tokens"))
            pick = rng.integers(views.shape[1], size=len(views))
            tokens.append(views[np.arange(len(views)), pick, : self.num_tokens])
            label = table.column("label")
            if label.null_count or (len(label) and pc.min(label).as_py() < 0):
                raise ValueError(f"{url}: some rows have no label (null or negative)")
            labels.append(label.to_numpy().astype(np.int64))
        if not tokens:
            return np.empty((0, self.num_tokens), np.uint16), np.empty(0, np.int64)
        return np.concatenate(tokens), np.concatenate(labels)

    @staticmethod
    def _batch(tokens: np.ndarray, labels: np.ndarray, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(tokens[idx].astype(np.int64)), torch.from_numpy(labels[idx])


def _read_rows(url: str, start: int, stop: int, storage_options: dict | None) -> pa.Table:
    """Rows [start, stop) of a shard's tokens and labels, reading only the row groups they span."""
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        groups, first, offset = [], None, 0
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if offset < stop and offset + n > start:
                groups.append(g)
                first = offset if first is None else first
            offset += n
        table = pf.read_row_groups(groups, columns=["tokens", "label"])
    return table.slice(start - first, stop - start)


class StreamLoader(IterableDataset):
    """This rank's slice of world-size-independent global batches: ``(tokens int64 [G/W,N], labels [G/W])``.

    Epoch ``e``: the shards are permuted with ``(seed, e)`` and their rows, in that order, are cut into
    ``streams`` equal contiguous pieces (the last ``rows % streams`` rows of the epoch are left out).
    Stream ``s`` reads its piece ``buffer_shards`` shards at a time (``None``: all at once), keeps one
    random view per row, permutes the buffer's rows (rng ``(seed, e, s)``) and deals ``G / streams`` rows
    per step. Global batch k is the concatenation of the streams' k-th deals, stream 0 first; rank r of
    W takes the contiguous streams ``[r S/W, (r+1) S/W)``, so its rows are ``[r G/W, (r+1) G/W)`` of the
    global batch, whatever W is. Under a DataLoader, worker w of a rank takes a contiguous run of its
    streams and yields its part of each step; ``step_batches`` joins the parts. ``set_epoch(e, skip)``
    starts epoch e after its first ``skip`` global batches (exact resume).
    """

    def __init__(
        self,
        files: TokenFiles,
        global_batch: int,
        streams: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        max_tokens: int | None = None,
        buffer_shards: int | None = None,
        row_counts: Sequence[int] | None = None,
    ):
        if streams < 1 or global_batch % streams:
            raise ValueError(f"the global batch ({global_batch}) must be a multiple of the data streams ({streams})")
        if streams % world_size:
            raise ValueError(f"{world_size} ranks cannot share {streams} data streams evenly (--data-streams "
                             "must be a multiple of the number of training workers)")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), not {rank}")
        if buffer_shards is not None and buffer_shards < 1:
            raise ValueError(f"buffer_shards must be >= 1 or None, not {buffer_shards}")
        if "label" not in files.schema().names:
            raise ValueError(f"{files.root} has no label column; class-conditional training needs labels")
        self.files, self.streams, self.global_batch = files, streams, global_batch
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.num_tokens = files.check_max_tokens(max_tokens)
        self.buffer_shards = buffer_shards
        self.counts = np.asarray(row_counts if row_counts is not None else files.row_counts(), np.int64)
        self.per_stream = global_batch // streams
        self.stream_rows = int(self.counts.sum()) // streams
        self.steps_per_epoch = self.stream_rows // self.per_stream
        if self.steps_per_epoch == 0:
            raise ValueError(f"{files.root} split {files.split!r}: {int(self.counts.sum())} rows make no global batch "
                             f"of {global_batch} over {streams} streams (each stream needs {self.per_stream} rows)")
        self.epoch, self.skip = 0, 0

    @property
    def local_batch(self) -> int:
        return self.global_batch // self.world_size

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def rank_streams(self) -> np.ndarray:
        per_rank = self.streams // self.world_size
        return np.arange(self.rank * per_rank, (self.rank + 1) * per_rank)

    def pieces(self, stream: int) -> list[tuple[int, int, int]]:
        """(shard index, first row, end row) that stream ``stream`` reads in the current epoch."""
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.counts))
        ends = np.cumsum(self.counts[order])
        lo, hi = stream * self.stream_rows, (stream + 1) * self.stream_rows
        out = []
        for shard, end, n in zip(order, ends, self.counts[order]):
            start = end - n
            if start < hi and end > lo and n:
                out.append((int(shard), int(max(lo, start) - start), int(min(hi, end) - start)))
        return out

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        mine = np.array_split(self.rank_streams(), num_workers)[worker]
        if not len(mine):
            raise ValueError(f"DataLoader worker {worker} of {num_workers} has no data stream (at most "
                             f"{len(self.rank_streams())} loader workers per rank)")
        deals = [self._deals(int(s)) for s in mine]
        for step in range(self.steps_per_epoch):
            parts = [next(d) for d in deals]
            if step >= self.skip:
                tokens = np.concatenate([p[0] for p in parts])
                labels = np.concatenate([p[1] for p in parts])
                yield torch.from_numpy(tokens.astype(np.int64)), torch.from_numpy(labels)

    def _deals(self, stream: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Endless ``per_stream``-row deals of one stream (only ``steps_per_epoch`` are taken)."""
        rng = np.random.default_rng([self.seed, self.epoch, stream])
        pieces = self.pieces(stream)
        step = self.buffer_shards or len(pieces)
        carry = (np.empty((0, self.num_tokens), np.uint16), np.empty(0, np.int64))
        for start in range(0, len(pieces), step):
            tokens, labels = self._read(pieces[start : start + step], rng)
            tokens, labels = np.concatenate([carry[0], tokens]), np.concatenate([carry[1], labels])
            order = rng.permutation(len(labels))
            full = len(order) - len(order) % self.per_stream
            for i in range(0, full, self.per_stream):
                idx = order[i : i + self.per_stream]
                yield tokens[idx], labels[idx]
            carry = (tokens[order[full:]], labels[order[full:]])

    def _read(self, pieces: Sequence[tuple[int, int, int]], rng: np.random.Generator):
        tokens, labels = [], []
        for shard, start, stop in pieces:
            url = self.files.files[shard]
            table = _read_rows(url, start, stop, self.files.storage_options)
            views = tokens_array(table.column("tokens"))
            pick = rng.integers(views.shape[1], size=len(views))
            tokens.append(views[np.arange(len(views)), pick, : self.num_tokens])
            label = table.column("label")
            if label.null_count or (len(label) and pc.min(label).as_py() < 0):
                raise ValueError(f"{url}: some rows have no label (null or negative)")
            labels.append(label.to_numpy().astype(np.int64))
        return np.concatenate(tokens), np.concatenate(labels)
