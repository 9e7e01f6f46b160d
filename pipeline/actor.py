"""The Ray encoder actor: one tokenizer on one device, shards in, committed shard stats out.

Life cycle (driven by ``pipeline.pool``): the constructor only stores its arguments; ``start``
loads the tokenizer, checks the device, starts the decode worker processes (``--decode-workers``
> 0: the staged path of ``pipeline.feed``), cleans this split's temp files of earlier runs on its
node and (local output) writes a probe file the driver must see; then ``run`` processes shards, up
to ``SHARDS_IN_FLIGHT`` at once (the next one reads and decodes while the last one commits).
"""
from __future__ import annotations

import os
import threading
import uuid

import ray
import torch

from tokenizer import load_tokenizer
from tokenizer.checkpoint import Checkpoint

from .decodepool import DecodePool
from .encode import ShardJob, encode_shard
from .feed import DeviceStage, DeviceTurns, FeedContext
from .records import InputShard
from .staging import clean_worker_temp
from .urls import is_local

# Set to 1 where Ray's GPUs are fake (tests, benchmarks on CPU machines): such actors encode on CPU.
SIMULATED_GPUS_ENV = "PRETOK_SIMULATED_GPUS"
DECODE_START_TIMEOUT_S = 300.0


class DeviceError(RuntimeError):
    """The actor holds a GPU it cannot use."""


class EncoderWorker:
    """Holds an encoder-only tokenizer (with its decoder when the job computes token counts or QA);
    ``run`` processes one shard at a time.

    Runs as a threaded Ray actor (``max_concurrency`` = shards in flight + 1) so the driver can
    poll ``progress`` while ``run`` is busy. ``tokenizer`` is the driver's :class:`Checkpoint` (passed as an
    ObjectRef, so Ray hands each node the same bytes from its object store; no node needs hub or
    storage access) or a source string; the fingerprint of the weights actually loaded is checked.
    """

    def __init__(self, tokenizer: Checkpoint | str, expected_fingerprint: str, job: ShardJob, torch_threads: int,
                 decode_workers: int = 0):
        self._args = (tokenizer, expected_fingerprint, torch_threads)
        self.job = job
        self.decode_workers = decode_workers
        self.tok = None
        self.feed: FeedContext | None = None
        self.identity: dict = {}
        self._done = 0
        self._lock = threading.Lock()

    def start(self) -> dict:
        """Load the tokenizer on this actor's device; returns its identity. Raises ``DeviceError``
        for a GPU actor whose torch sees no CUDA device (unless GPUs are simulated)."""
        tokenizer, expected_fingerprint, torch_threads = self._args
        gpu_ids = [str(g) for g in ray.get_gpu_ids()] if ray.is_initialized() else []
        cuda = torch.cuda.is_available()
        simulated = os.environ.get(SIMULATED_GPUS_ENV) == "1"
        if gpu_ids and not cuda and not simulated:
            raise DeviceError(
                f"this actor holds GPU {','.join(gpu_ids)} but torch {torch.__version__} sees no CUDA device "
                f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); install a CUDA build of torch, "
                f"or use --gpus-per-actor 0 to encode on CPU"
            )
        device = "cuda" if gpu_ids and cuda else "cpu"
        torch.set_num_threads(max(1, torch_threads))
        parts = "encoder" if self.job.token_counts is None and self.job.qa_every <= 0 else "all"  # QA decodes
        self.tok = load_tokenizer(tokenizer, device=device, parts=parts, storage_options=self.job.storage_options)
        if self.tok.fingerprint != expected_fingerprint:
            raise RuntimeError(
                f"tokenizer checkpoint changed since the run started (fingerprint {self.tok.fingerprint[:12]} "
                f"!= {expected_fingerprint[:12]})"
            )
        if self.decode_workers > 0:
            initializer, initargs = self.decode_initializer()
            pool = DecodePool(self.decode_workers, initializer, initargs)
            pool.warm(DECODE_START_TIMEOUT_S)
            t = self.job.transform
            max_views = self.job.batch_size * t.num_views
            self.feed = FeedContext(pool, DeviceStage(self.tok, self.job.precision, max_views,
                                                      (3, t.resolution, t.resolution)), DeviceTurns())
        if device == "cuda":
            device_type = torch.cuda.get_device_name()
        else:
            device_type = "cpu (simulated GPU)" if gpu_ids else "cpu"
        self.identity = {
            "node_id": _node_id(),
            "actor_id": _actor_id(),
            "gpu_ids": gpu_ids,
            "device": device,
            "device_type": device_type,
            "pid": os.getpid(),
            "cleaned_temp_files": clean_worker_temp(self.job.layout, self.job.run_id),
            "probe": self._probe(),
        }
        return self.identity

    def decode_initializer(self) -> tuple:
        """(function, args) each decode worker process runs as it starts; none here."""
        return None, ()

    def _probe(self) -> str | None:
        """For a local output, a file the driver must see (else the output is not shared with it)."""
        if not is_local(self.job.layout.root):
            return None
        folder = self.job.layout.tmp_dir
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"probe-{self.job.run_id}-{uuid.uuid4().hex[:8]}")
        with open(path, "w") as f:
            f.write(_node_id())
        return path

    def _advance(self, n: int) -> None:
        with self._lock:
            self._done += n

    def run(self, shard: InputShard, attempt: int = 1):
        if self.tok is None:
            raise RuntimeError("run() before start()")
        worker = {k: v for k, v in self.identity.items() if k not in ("probe", "cleaned_temp_files")}
        return encode_shard(self.tok, shard, self.job, self._advance, {**worker, "attempt": attempt}, self.feed)

    def progress(self) -> int:
        """Images processed by this actor so far (all shards)."""
        with self._lock:
            return self._done


def _node_id() -> str:
    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"


def _actor_id() -> str:
    return (ray.get_runtime_context().get_actor_id() or "") if ray.is_initialized() else ""


EncoderActor = ray.remote(EncoderWorker)
