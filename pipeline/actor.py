"""The Ray encoder actor: one tokenizer on one device, shards in, committed shard stats out."""
from __future__ import annotations

import os
import threading

import ray
import torch

from tokenizer import load_tokenizer
from tokenizer.checkpoint import Checkpoint

from .encode import ShardJob, encode_shard
from .records import InputShard


class EncoderWorker:
    """Holds an encoder-only tokenizer (with its decoder when the job computes token counts);
    ``run`` processes one shard at a time.

    Runs as a threaded Ray actor (``max_concurrency=2``) so the driver can poll ``progress``
    while ``run`` is busy. ``tokenizer`` is the driver's :class:`Checkpoint` (passed as an
    ObjectRef, so Ray hands each node the same bytes from its object store; no node needs hub or
    storage access) or a source string; the fingerprint of the weights actually loaded is checked.
    """

    def __init__(self, tokenizer: Checkpoint | str, expected_fingerprint: str, job: ShardJob, torch_threads: int):
        gpu_ids = [str(g) for g in ray.get_gpu_ids()] if ray.is_initialized() else []
        device = "cuda" if gpu_ids and torch.cuda.is_available() else "cpu"
        torch.set_num_threads(max(1, torch_threads))
        parts = "encoder" if job.token_counts is None else "all"
        self.tok = load_tokenizer(tokenizer, device=device, parts=parts, storage_options=job.storage_options)
        if self.tok.fingerprint != expected_fingerprint:
            raise RuntimeError(
                f"tokenizer checkpoint changed since the run started (fingerprint {self.tok.fingerprint[:12]} "
                f"!= {expected_fingerprint[:12]})"
            )
        self.job = job
        self.identity = {
            "node_id": ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local",
            "gpu_ids": gpu_ids,
            "device": device,
            "pid": os.getpid(),
        }
        self._done = 0
        self._lock = threading.Lock()

    def _advance(self, n: int) -> None:
        with self._lock:
            self._done += n

    def run(self, shard: InputShard, attempt: int = 1):
        return encode_shard(self.tok, shard, self.job, self._advance, {**self.identity, "attempt": attempt})

    def progress(self) -> int:
        """Images processed by this actor so far (all shards)."""
        with self._lock:
            return self._done

    def info(self) -> dict:
        return self.identity


EncoderActor = ray.remote(EncoderWorker)
