"""The staged data path of one shard inside an encoder actor, each stage behind a bounded queue:

```
read (thread: records, cut into batches) -> decode+transform (DecodePool processes, views in a
shared-memory slab per batch) -> device (DeviceStage: encode_uint8; CUDA: pinned double buffers)
-> write (thread: Parquet row groups) -> commit (the caller, after the last batch)
```
Batches are cut in shard order with a fixed size and taken off the decode stage in that order, so
the tokens are those of the in-thread path (``pipeline.encode``), whatever the timing. Two shards
may run at once in one actor (the pool keeps two in flight): ``DeviceTurns`` lets them use the
device one after the other, in the order they arrived, so the next shard reads and decodes while
the previous one finishes on the device and commits.
"""
from __future__ import annotations

import itertools
import math
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np
import torch

from tokenizer.base import ImageTokenizer

from .decodepool import DecodePool, DecodeTask, Slab
from .records import DecodedImage, Record, SkippedRecord

STAGE_TIMEOUT_S = 600.0  # a stage that hands nothing on for this long fails the attempt
# Waiting for the other shard of this actor to finish on the device: at most its remaining batches;
# a shard hung there stops the actor's progress, which the driver's stall timeout catches.
DEVICE_TURN_TIMEOUT_S = 6 * 3600.0


@dataclass(frozen=True)
class FeedBounds:
    """Queue bounds of one shard's stages, in batches."""

    read: int       # batches read and waiting for a free slab
    decode: int     # slabs: batches in the decode pool or waiting for the device
    write: int      # encoded batches waiting for the writer
    per_task: int   # records per decode task

    @classmethod
    def of(cls, workers: int, batch_size: int) -> FeedBounds:
        """Enough decoded batches in flight to keep every worker busy twice over, plus one on the device."""
        per_task = max(1, math.ceil(batch_size / max(1, workers)))
        tasks_per_batch = math.ceil(batch_size / per_task)
        return cls(read=2, decode=max(2, math.ceil(2 * workers / tasks_per_batch)) + 1, write=2, per_task=per_task)


class DeviceTurns:
    """First come, first served use of the device by the shards of one actor (tickets)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._issued = 0
        self._serving = 0
        self._finished: set[int] = set()

    def take(self) -> int:
        with self._cond:
            self._issued += 1
            return self._issued - 1

    def wait(self, ticket: int, timeout: float) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: self._serving == ticket, timeout):
                raise TimeoutError(f"the device was not free for this shard within {timeout:.0f} s")

    def finish(self, ticket: int) -> None:
        """The ticket's shard is done with the device (or failed); idempotent."""
        with self._cond:
            if ticket < self._serving:
                return
            self._finished.add(ticket)
            while self._serving in self._finished:
                self._finished.remove(self._serving)
                self._serving += 1
            self._cond.notify_all()


class DeviceStage:
    """uint8 views [n,3,R,R] -> uint16 ids [n,N] through ``tok.encode_uint8``, asynchronously.

    On CUDA two pinned host buffers, each used by its own thread on its own stream: the copy into
    buffer i+1 and its host-to-device transfer overlap batch i, and the device-to-host copy of
    batch i overlaps batch i+1. On CPU one thread encodes straight from the slab (no pinning).
    A QA hook belongs after ``result``: it gets the batch's views and ids there.
    """

    def __init__(self, tok: ImageTokenizer, precision: str, max_views: int, view_shape: tuple[int, ...]):
        self.tok, self.precision = tok, precision
        self.cuda = tok.device.type == "cuda"
        depth = self.depth = 2 if self.cuda else 1
        self._executor = ThreadPoolExecutor(depth, thread_name_prefix="device")
        self._locks = [threading.Lock() for _ in range(depth)]
        self._pinned = [torch.empty((max_views, *view_shape), dtype=torch.uint8).pin_memory()
                        for _ in range(depth)] if self.cuda else []
        self._streams = [torch.cuda.Stream(device=tok.device) for _ in range(depth)] if self.cuda else []
        self._n = 0

    def submit(self, views: np.ndarray) -> Future:
        k = self._n % len(self._locks)
        self._n += 1
        return self._executor.submit(self._encode, k, views)

    def _encode(self, k: int, views: np.ndarray) -> np.ndarray:
        with self._locks[k]:
            x = torch.from_numpy(views)
            if not self.cuda:
                return self.tok.encode_uint8(x, precision=self.precision).numpy()
            buf = self._pinned[k][: len(views)]
            buf.copy_(x)
            with torch.cuda.stream(self._streams[k]):
                return self.tok.encode_uint8(buf, precision=self.precision).numpy()

    def close(self) -> None:
        self._executor.shutdown(wait=True)


@dataclass
class _Batch:
    records: list[Record]
    slab: Slab
    tasks: list[Future]


_END = object()


class _Reader(threading.Thread):
    """Reads the shard's records into batches of ``batch_size``, at most ``bound`` ahead."""

    def __init__(self, records: Iterator[Record], batch_size: int, bound: int):
        super().__init__(name="read", daemon=True)
        self.records, self.batch_size = records, batch_size
        self.out: queue.Queue = queue.Queue(bound)
        self.stop = threading.Event()

    def _put(self, item) -> bool:
        while not self.stop.is_set():
            try:
                self.out.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def run(self) -> None:
        try:
            it = iter(self.records)
            while batch := list(itertools.islice(it, self.batch_size)):
                if not self._put(batch):
                    return
            self._put(_END)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it
            self._put(e)
        finally:
            close = getattr(self.records, "close", None)
            if close is not None and self.stop.is_set():
                close()

    def get(self, timeout: float):
        try:
            item = self.out.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no records read within {timeout:.0f} s") from None
        if isinstance(item, BaseException):
            raise item
        return item


class _Writer(threading.Thread):
    """Appends encoded batches to the shard's writer in the background."""

    def __init__(self, write: Callable[[list, np.ndarray], None], bound: int):
        super().__init__(name="write", daemon=True)
        self.write = write
        self.inbox: queue.Queue = queue.Queue(bound)
        self.error: BaseException | None = None

    def run(self) -> None:
        while (item := self.inbox.get()) is not _END:
            if self.error is None:
                try:
                    self.write(*item)
                except BaseException as e:  # noqa: BLE001 - raised by ``put``/``finish``
                    self.error = e

    def put(self, rows: list, tokens: np.ndarray) -> None:
        if self.error is not None:
            raise self.error
        try:
            self.inbox.put((rows, tokens), timeout=STAGE_TIMEOUT_S)
        except queue.Full:
            raise TimeoutError(f"the Parquet writer took no batch within {STAGE_TIMEOUT_S:.0f} s") from None

    def finish(self, timeout: float = STAGE_TIMEOUT_S) -> None:
        self.inbox.put(_END, timeout=timeout)
        self.join(timeout)
        if self.is_alive():
            raise TimeoutError(f"the Parquet writer did not finish within {timeout:.0f} s")
        if self.error is not None:
            raise self.error


@dataclass(frozen=True)
class FeedContext:
    """What the staged path shares across the shards of one actor."""

    pool: DecodePool
    device: DeviceStage
    turns: DeviceTurns


@dataclass
class _OnDevice:
    batch: _Batch
    results: list                   # decode results in record order
    images: list[DecodedImage]      # the decoded ones, views in the slab
    ids: Future | None              # None: nothing to encode


def feed_shard(
    ctx: FeedContext,
    records: Iterator[Record],
    batch_size: int,
    transform,
    fast_decode: bool,
    finish_batch: Callable[[list[DecodedImage], np.ndarray], list[DecodedImage]],
    write: Callable[[list, np.ndarray], None],
    on_batch: Callable[[list], None],
) -> None:
    """Run one shard's records through the stages. ``finish_batch(images, tokens)`` runs after
    the device (kept columns, token counts, a QA hook; views still valid) and returns the rows to
    write; ``on_batch(results)`` gets every batch's decode results (rows and skips) in order. Returns
    when every row is written (not committed)."""
    bounds = FeedBounds.of(ctx.pool.workers, batch_size)
    view_shape = (transform.num_views, 3, transform.resolution, transform.resolution)
    reader = _Reader(records, batch_size, bounds.read)
    writer = _Writer(write, bounds.write)
    ticket = ctx.turns.take()
    decoding: deque[_Batch] = deque()
    on_device: deque[_OnDevice] = deque()
    has_turn = ended = False
    reader.start()
    writer.start()
    try:
        while True:
            while not ended and len(decoding) + len(on_device) < bounds.decode:
                if decoding and reader.out.empty():
                    break  # block on the reader only when nothing is being decoded
                batch = reader.get(STAGE_TIMEOUT_S)
                if batch is _END:
                    ended = True
                    break
                decoding.append(_submit(ctx.pool, batch, view_shape, transform, fast_decode, bounds.per_task))
            if decoding:
                head = decoding.popleft()
                step = _OnDevice(head, [], [], None)
                on_device.append(step)
                step.results = _collect(ctx.pool, head)
                step.images = [r for r in step.results if isinstance(r, DecodedImage)]
                if step.images:
                    if not has_turn:
                        ctx.turns.wait(ticket, DEVICE_TURN_TIMEOUT_S)
                        has_turn = True
                    step.images = _with_views(step.results, head.slab.array)
                    step.ids = ctx.device.submit(_device_input(step, head.slab.array, view_shape))
            elif not on_device:
                break
            while on_device and (len(on_device) >= ctx.device.depth or not decoding):
                step = on_device.popleft()
                _finish(step, view_shape[0], finish_batch, writer, on_batch)
        ctx.turns.finish(ticket)
        writer.finish()
    except BaseException:
        reader.stop.set()
        for b in [*decoding, *(s.batch for s in on_device)]:
            for t in b.tasks:
                t.cancel()
            b.slab.close()  # a worker still writing keeps its own mapping
        raise
    finally:
        ctx.turns.finish(ticket)
        reader.stop.set()
        if writer.is_alive():  # failing: let it stop before the caller aborts the Parquet file
            try:
                writer.inbox.put(_END, timeout=STAGE_TIMEOUT_S)
            except queue.Full:
                pass
            writer.join(STAGE_TIMEOUT_S)


def _with_views(results: list, slab: np.ndarray) -> list[DecodedImage]:
    """The decoded rows with ``views`` = their slot of the slab (no copy)."""
    return [replace(r, views=slab[i]) for i, r in enumerate(results) if isinstance(r, DecodedImage)]


def _device_input(step: _OnDevice, slab: np.ndarray, view_shape) -> np.ndarray:
    """uint8 [n*V,3,R,R]: a view of the slab when no record of the batch was skipped, else a copy."""
    if len(step.images) == len(step.results):
        return slab[: len(step.images)].reshape(-1, *view_shape[1:])
    return np.concatenate([d.views for d in step.images])


def _finish(step: _OnDevice, num_views: int, finish_batch, writer: _Writer, on_batch) -> None:
    try:
        if step.ids is not None:
            tokens = step.ids.result(timeout=STAGE_TIMEOUT_S).reshape(len(step.images), num_views, -1)
            rows = finish_batch(step.images, tokens)
            writer.put([replace(r, views=None) for r in rows], tokens)
        on_batch(step.results)
    finally:
        step.images = []
        step.batch.slab.close()


def _submit(pool: DecodePool, records: list[Record], view_shape, transform, fast: bool, per_task: int) -> _Batch:
    slab = Slab(len(records), view_shape)
    tasks = []
    try:
        for first in range(0, len(records), per_task):
            chunk = records[first:first + per_task]
            tasks.append(pool.submit(DecodeTask(chunk, slab.name, first, slab.slots, view_shape, transform, fast)))
    except BaseException:
        for t in tasks:
            t.cancel()
        slab.close()
        raise
    return _Batch(records, slab, tasks)


def _collect(pool: DecodePool, batch: _Batch) -> list[DecodedImage | SkippedRecord]:
    """The batch's decode results in record order (views in the slab)."""
    results: list = []
    for task in batch.tasks:
        results += pool.result(task, STAGE_TIMEOUT_S).rows
    return results
