"""Decode + transform in worker processes owned by one encoder actor; views come back in shared memory.

The actor owns a ``concurrent.futures.ProcessPoolExecutor`` over a ``forkserver`` context (never
``fork``: the actor has torch and Ray threads; the fork server preloads this module, so workers
start without importing it again). A task is a run of consecutive records of one
batch and a slot range of that batch's shared-memory slab (``Slab``); the worker decodes each record
with ``pipeline.decode.decode_record`` and writes its views straight into its slot, so only the
encoded bytes (in) and small row metadata (out) are pickled. A worker that dies (SIGKILL, the
kernel's OOM killer) breaks the executor: every task in flight then raises ``DecodeWorkerLost``,
a retryable error, and ``rebuild`` starts fresh workers for the next shard.
"""
from __future__ import annotations

import mmap
import os
import resource
import sys
import threading
import time
import types
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, replace
from multiprocessing import context as mp_context
from multiprocessing import popen_forkserver
from multiprocessing.shared_memory import SharedMemory

import numpy as np

from pipeline import decode as decode_module
from pipeline.records import DecodedImage, Record, SkippedRecord
from tokenizer.transform import ImageTransform

SHM_DIR = "/dev/shm"  # where POSIX shared memory objects live on Linux


_BARE_MAIN = types.ModuleType("__main__")
_MAIN_LOCK = threading.Lock()


class _Popen(popen_forkserver.Popen):
    """Starts a worker without re-running the parent's main module in it: multiprocessing would
    import an actor's (Ray's ``default_worker.py``, a script) in every worker."""

    def _launch(self, process_obj) -> None:
        with _MAIN_LOCK:
            main, sys.modules["__main__"] = sys.modules["__main__"], _BARE_MAIN
            try:
                super()._launch(process_obj)
            finally:
                sys.modules["__main__"] = main


class _Process(mp_context.ForkServerProcess):
    @staticmethod
    def _Popen(process_obj):
        return _Popen(process_obj)


class _ForkServer(mp_context.ForkServerContext):
    Process = _Process


OWNER_POLL_S = 1.0


def _watch_owner(owner: int) -> None:
    while True:
        time.sleep(OWNER_POLL_S)
        try:
            os.kill(owner, 0)
        except ProcessLookupError:
            os._exit(0)


def _worker_start(owner: int, initializer: Callable | None, initargs: tuple) -> None:
    """In each worker: exit when the pool's owner (the actor) is gone, then the pool's own
    initializer. Workers are children of the fork server, which itself lives as long as any of
    them does, so neither would notice a killed actor otherwise."""
    threading.Thread(target=_watch_owner, args=(owner,), name="owner-watch", daemon=True).start()
    if initializer is not None:
        initializer(*initargs)


class DecodeWorkerLost(RuntimeError):
    """A decode worker process died while the shard was being decoded; the attempt is retried."""


class Slab:
    """One batch's decoded views: uint8 [slots, V, 3, R, R] in a shared-memory block the actor owns."""

    def __init__(self, slots: int, view_shape: tuple[int, ...]):
        self.slots, self.view_shape = slots, tuple(view_shape)
        self.slot_bytes = int(np.prod(view_shape))
        self._shm = SharedMemory(create=True, size=max(1, slots * self.slot_bytes))
        self.name = self._shm.name
        self.array = np.ndarray((slots, *self.view_shape), np.uint8, buffer=self._shm.buf)

    def close(self) -> None:
        """Release the block (idempotent; views of ``array`` must not be used afterwards)."""
        if self.array is None:
            return
        self.array = None
        try:
            self._shm.close()
        except BufferError:
            pass  # a view is still alive somewhere: the mapping goes when it does
        try:
            self._shm.unlink()
        except FileNotFoundError:
            pass


@dataclass(frozen=True)
class DecodeTask:
    """Records ``records`` go to slots ``first, first+1, ...`` of slab ``slab``."""

    records: Sequence[Record]
    slab: str
    first: int
    slots: int
    view_shape: tuple[int, ...]
    transform: ImageTransform
    fast: bool = False


@dataclass(frozen=True)
class TaskResult:
    rows: list                      # DecodedImage (views=None: they are in the slab) | SkippedRecord
    pid: int
    max_rss_bytes: int              # the worker's peak resident set so far


def decode_task(task: DecodeTask) -> TaskResult:
    """Worker side: decode ``task.records`` into their slab slots."""
    slot_bytes = int(np.prod(task.view_shape))
    rows = []
    # Opened as a plain file, not SharedMemory: attaching would register the block with the resource
    # tracker this worker shares with the actor, which then forgets the actor's own registration.
    with open(os.path.join(SHM_DIR, task.slab.lstrip("/")), "r+b") as f:
        mm = mmap.mmap(f.fileno(), task.slots * slot_bytes)
    try:
        slab = np.ndarray((task.slots, *task.view_shape), np.uint8, buffer=mm)
        for j, record in enumerate(task.records):
            out = decode_module.decode_record(record, task.transform, fast=task.fast)
            if isinstance(out, DecodedImage):
                slab[task.first + j] = out.views
                out = replace(out, views=None)
            rows.append(out)
        del slab
    finally:
        mm.close()
    return TaskResult(rows, os.getpid(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


class DecodePool:
    """``workers`` decode processes; ``submit`` returns a future of ``TaskResult``.

    ``initializer(*initargs)`` runs in each worker as it starts (picklable; tests install faults
    with it)."""

    def __init__(self, workers: int, initializer: Callable | None = None, initargs: tuple = ()):
        if workers < 1:
            raise ValueError(f"a decode pool needs at least 1 worker, not {workers}")
        self.workers = workers
        self._init = (initializer, initargs)
        self._ctx = _ForkServer()
        self._ctx.set_forkserver_preload(["pipeline.decodepool"])
        self._executor: ProcessPoolExecutor | None = None
        self.rebuilds = 0
        self.peak_rss: dict[int, int] = {}   # worker pid -> its peak resident set (bytes)

    def _pool(self) -> ProcessPoolExecutor:
        if self._executor is None:
            initializer, initargs = self._init
            self._executor = ProcessPoolExecutor(self.workers, mp_context=self._ctx,
                                                 initializer=_worker_start,
                                                 initargs=(os.getpid(), initializer, initargs))
        return self._executor

    def warm(self, timeout: float) -> list[int]:
        """Start every worker now (not in the first shard); returns their pids."""
        futures = [self._pool().submit(os.getpid) for _ in range(self.workers)]
        try:
            return sorted({f.result(timeout=timeout) for f in futures})
        except BrokenProcessPool as e:
            raise DecodeWorkerLost(f"the decode worker processes did not start: {e}") from None
        except TimeoutError:
            raise TimeoutError(f"{self.workers} decode worker processes did not start within {timeout:.0f} s") from None

    def submit(self, task: DecodeTask) -> Future:
        """Queue ``task``; a pool broken by a worker that died meanwhile is rebuilt first (tasks
        still in flight on it fail in ``result``)."""
        try:
            return self._pool().submit(decode_task, task)
        except BrokenProcessPool:
            self.rebuild()
            return self._pool().submit(decode_task, task)

    def result(self, future: Future, timeout: float) -> TaskResult:
        """The task's result; ``DecodeWorkerLost`` when a worker died (the pool is rebuilt)."""
        try:
            out = future.result(timeout=timeout)
        except BrokenProcessPool as e:
            if self._executor is not None and getattr(self._executor, "_broken", False):
                self.rebuild()  # once, by whichever shard saw it first
            raise DecodeWorkerLost(f"a decode worker process died during the shard ({e}); "
                                   "the decode pool was restarted") from None
        except TimeoutError:
            raise TimeoutError(f"no decoded batch within {timeout:.0f} s from {self.workers} decode workers") from None
        self.peak_rss[out.pid] = max(out.max_rss_bytes, self.peak_rss.get(out.pid, 0))
        return out

    def rebuild(self) -> None:
        """Drop a broken executor; the next ``submit`` starts new workers."""
        executor, self._executor = self._executor, None
        if executor is not None:
            self.rebuilds += 1
            executor.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
