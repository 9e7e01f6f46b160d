"""``--dry-run --estimate K``: time K images through read, decode and encode where an encoder
actor would run (a Ray task with the actor's resources), and project the run's duration.

The model of an actor: reading is sequential, decoding is spread over its decode workers and
overlaps encoding, so an actor runs at the pace of its slowest stage. Image counts of tar and
Parquet shards are not known before reading them, so the pending images are estimated from bytes.
"""
from __future__ import annotations

import os
import time
from collections.abc import Sequence
from contextlib import closing
from dataclasses import dataclass

import ray
import torch

from tokenizer import load_tokenizer
from tokenizer.checkpoint import Checkpoint
from tokenizer.transform import ImageTransform

from .actor import SIMULATED_GPUS_ENV
from .decode import decode_record
from .encode import encode_views
from .failures import describe
from .plan import ActorPlan
from .records import DecodedImage, InputShard
from .sources import iter_records
from .sources.webdataset import DEFAULT_MAX_MEMBER_BYTES


class EstimateError(RuntimeError):
    """The sample could not be measured; the message says why."""


@dataclass(frozen=True)
class SampleTiming:
    """What one sample of images cost, stage by stage (seconds in all)."""

    images: int                                 # records read (decoded or skipped)
    encoded: int                                # images that reached the encoder
    image_bytes: int                            # encoded (JPEG, PNG, ...) bytes of the records read
    whole_shards: tuple[tuple[int, int], ...]   # (images, bytes) of sampled shards read to their end
    load_s: float                               # loading the tokenizer (once per actor)
    read_s: float
    decode_s: float                             # on one thread
    encode_s: float                             # after one untimed warm-up call
    device: str


def _device() -> tuple[str, str]:
    """(torch device, its name) an actor holding these resources encodes on (as ``EncoderWorker.start``)."""
    gpus = ray.get_gpu_ids() if ray.is_initialized() else []
    if not gpus:
        return "cpu", "cpu"
    if torch.cuda.is_available():
        return "cuda", torch.cuda.get_device_name()
    if os.environ.get(SIMULATED_GPUS_ENV) == "1":
        return "cpu", "cpu (simulated GPU)"
    raise EstimateError(f"the sample holds GPU {gpus} but torch {torch.__version__} sees no CUDA device")


def measure_sample(
    ckpt: Checkpoint, shards: Sequence[InputShard], transform: ImageTransform, images: int, batch_size: int,
    precision: str = "fp32", storage_options: dict | None = None, threads: int = 1,
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES, fast_decode: bool = False,
) -> SampleTiming:
    """Read, decode and encode the first ``images`` records of ``shards`` (in order); nothing is written."""
    device, device_name = _device()
    torch.set_num_threads(max(1, threads))
    t = time.perf_counter()
    tok = load_tokenizer(ckpt, device=device, parts="encoder")
    load_s = time.perf_counter() - t
    decoded: list[DecodedImage] = []
    read = nbytes = 0
    read_s = decode_s = 0.0
    whole = []
    for shard in shards:
        n = 0
        with closing(iter_records(shard, storage_options, max_member_bytes=max_member_bytes)) as records:
            while read + n < images:
                t = time.perf_counter()
                record = next(records, None)
                read_s += time.perf_counter() - t
                if record is None:
                    if shard.size is not None:
                        whole.append((n, shard.size))
                    break
                t = time.perf_counter()
                d = decode_record(record, transform, fast=fast_decode)
                decode_s += time.perf_counter() - t
                n += 1
                nbytes += len(record.image or b"")
                if isinstance(d, DecodedImage):
                    decoded.append(d)
        read += n
        if read >= images:
            break
    encode_s = 0.0
    if decoded:
        encode_views(tok, decoded[:batch_size], precision)  # warm-up: kernels, allocator
        t = time.perf_counter()
        for i in range(0, len(decoded), batch_size):
            encode_views(tok, decoded[i:i + batch_size], precision)
        encode_s = time.perf_counter() - t
    return SampleTiming(read, len(decoded), nbytes, tuple(whole), load_s, read_s, decode_s, encode_s, device_name)


def sample_on_cluster(
    ckpt: Checkpoint, shards: Sequence[InputShard], transform: ImageTransform, images: int, batch_size: int,
    precision: str, plan: ActorPlan, storage_options: dict | None, timeout_s: float,
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES, fast_decode: bool = False,
) -> SampleTiming:
    """``measure_sample`` in a Ray task that asks for one actor's resources; EstimateError when it
    fails or does not finish within ``timeout_s`` (no node with room, a hung read)."""
    task = ray.remote(measure_sample).options(num_gpus=plan.gpus_per_actor, num_cpus=plan.cpus_per_actor,
                                               max_retries=0)
    ref = task.remote(ray.put(ckpt), list(shards), transform, images, batch_size, precision, storage_options,
                      max(1, int(plan.cpus_per_actor)), max_member_bytes, fast_decode)
    ready, _ = ray.wait([ref], timeout=timeout_s)
    if not ready:
        ray.cancel(ref, force=True)
        raise EstimateError(f"the sample did not finish within {timeout_s:.0f} s (is there a node with room for "
                            f"{{GPU: {plan.gpus_per_actor:g}, CPU: {plan.cpus_per_actor:g}}}?)")
    try:
        return ray.get(ref, timeout=60)
    except Exception as e:  # noqa: BLE001 - any failure of the sample is reported, not raised
        raise EstimateError(f"the sample failed: {describe(e)}") from None


@dataclass(frozen=True)
class Estimate:
    """A sample's timing projected onto the pending shards."""

    sample: SampleTiming
    actors: int               # actors that run at once (the plan's, as far as the nodes hold them)
    decode_workers: int
    pending_images: int
    basis: str                # how ``pending_images`` was found

    @property
    def seconds_per_image(self) -> float:
        """One actor's pace: its slowest stage per image (decoding spread over its workers)."""
        s = self.sample
        stages = [s.read_s / max(1, s.images), s.decode_s / max(1, s.images) / self.decode_workers]
        if s.encoded:
            stages.append(s.encode_s / s.encoded)
        return max(stages)

    @property
    def images_per_second(self) -> float:
        """The cluster's pace: every running actor at one actor's pace."""
        return self.actors / self.seconds_per_image if self.seconds_per_image > 0 else float("inf")

    @property
    def hours(self) -> float:
        return self.pending_images / self.images_per_second / 3600

    def describe(self) -> str:
        s = self.sample
        ms = lambda total, n: f"{1000 * total / max(1, n):.1f} ms"  # noqa: E731
        return "\n".join([
            f"estimate sample of {s.images} images ({s.encoded} encoded) on {s.device}: tokenizer load "
            f"{s.load_s:.1f} s; per image read {ms(s.read_s, s.images)}, decode {ms(s.decode_s, s.images)} "
            f"(/{self.decode_workers} workers), encode {ms(s.encode_s, s.encoded)}",
            f"         {1 / self.seconds_per_image:.1f} img/s per actor x {self.actors} actors = "
            f"{self.images_per_second:.1f} img/s",
            f"         {self.pending_images} pending images ({self.basis}) -> {self.hours:.2f} hours "
            f"({_duration(self.hours * 3600)}; tokenizer loads and stragglers not counted)",
        ])


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.0f} h {seconds % 3600 / 60:.0f} min"


def pending_images(sample: SampleTiming, pending: Sequence[InputShard]) -> tuple[int, str]:
    """(images of ``pending``, how that was found): exact for image folders, else from bytes."""
    if not pending:
        return 0, "nothing pending"
    if all(s.members for s in pending):
        return sum(len(s.members) for s in pending), "exact: image-folder shards"
    known = [s.size for s in pending if s.size is not None]
    unknown = len(pending) - len(known)
    total = sum(known) + unknown * (sum(known) / len(known) if known else 0)
    extra = f"; {unknown} shards of unknown size counted at the mean" if unknown and known else ""
    if sample.whole_shards:
        images, nbytes = map(sum, zip(*sample.whole_shards))
        per = nbytes / max(1, images)
        how = (f"estimated from {total:.0f} bytes at {per:.0f} bytes per image, as in the "
               f"{len(sample.whole_shards)} sampled shard(s) read to the end")
    else:
        per = sample.image_bytes / max(1, sample.images)
        how = (f"estimated from {total:.0f} bytes at the sample's mean image size, {per:.0f} bytes: an upper "
               "bound, as container overhead and sidecars count as images")
    return (round(total / per) if per > 0 else 0), how + extra


def project(sample: SampleTiming, plan: ActorPlan, pending: Sequence[InputShard]) -> Estimate:
    count, basis = pending_images(sample, pending)
    running = min(plan.actors, plan.capacity) if plan.capacity else plan.actors
    return Estimate(sample, running, plan.decode_workers, count, basis)
