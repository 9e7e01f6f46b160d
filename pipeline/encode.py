"""One shard, start to finish: read -> decode -> encode (device) -> write -> commit.

Ray-free, so the same code runs in an encoder actor, in a test, or in a benchmark. Two data paths
with the same tokens: the staged one (``pipeline.feed``: decode worker processes, background read
and write) when a ``FeedContext`` is given, else the in-thread one (``--decode-workers 0``): a
thread pool decodes batch i+1 while the device encodes batch i, reading and writing in line.
Batches are cut in shard order with a fixed size, so the tokens of a shard do not depend on
timing, retries or the path.
With ``ShardJob.token_counts`` each row also gets ``num_tokens_needed`` (its first view's token
count, ``tokenizer.flextok.counts``), which costs a few decodes per image on the same device.
"""
from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np
import torch

from tokenizer.base import ImageTokenizer
from tokenizer.flextok.counts import TokenCountSettings, count_tokens
from tokenizer.transform import ImageTransform

from .decode import decode_record
from .feed import FeedContext, feed_shard
from .layout import OutputLayout
from .ledger import ShardStats, redact_url
from .qa import DEFAULT_QA_EVERY, ShardQA
from .records import DecodedImage, InputShard, Record, SkippedRecord
from .schema import TokenSchema
from .sources import iter_records
from .sources.passthrough import KeptValues
from .sources.webdataset import DEFAULT_MAX_MEMBER_BYTES
from .writer import ShardWriter


@dataclass(frozen=True)
class ShardJob:
    """Everything a worker needs to produce one output shard (picklable for Ray)."""

    layout: OutputLayout
    schema: TokenSchema
    manifest: dict
    run_fingerprint: str
    transform: ImageTransform
    batch_size: int = 64
    precision: str = "fp32"
    decode_threads: int = 2             # in-thread path only
    storage_options: dict | None = None
    token_counts: TokenCountSettings | None = None
    run_id: str = ""
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES
    fast_decode: bool = False           # JPEG DCT-domain downscaling (pipeline.decode)
    qa_every: int = DEFAULT_QA_EVERY   # decode every K-th written row back (pipeline.qa); 0 = off


def _batches(records: Iterable[Record], size: int) -> Iterator[list[Record]]:
    it = iter(records)
    while batch := list(itertools.islice(it, size)):
        yield batch


def encode_views(tok: ImageTokenizer, images: list[DecodedImage], precision: str) -> np.ndarray:
    """uint16 tokens [B,V,N] for decoded images (all views of a batch in one device call)."""
    views = np.concatenate([d.views for d in images])  # [B*V,3,R,R]
    x = torch.from_numpy(views)
    if tok.device.type == "cuda":
        x = x.pin_memory()
    ids = tok.encode_uint8(x, precision=precision).numpy()
    return ids.reshape(len(images), -1, ids.shape[-1])


def with_token_counts(
    tok: ImageTokenizer, images: list[DecodedImage], tokens: np.ndarray, settings: TokenCountSettings, precision: str
) -> list[DecodedImage]:
    """The images with ``num_tokens_needed`` set from their first view (``tokens`` uint16 [B,V,N])."""
    views = torch.from_numpy(np.stack([d.views[0] for d in images])).to(tok.device).float().div_(255.0)
    ids = torch.from_numpy(tokens[:, 0].astype(np.int64))
    counts = count_tokens(tok, views, ids, [d.key for d in images], settings, precision).counts
    return [replace(d, num_tokens_needed=int(c)) for d, c in zip(images, counts)]


def encode_shard(
    tok: ImageTokenizer,
    shard: InputShard,
    job: ShardJob,
    on_progress: Callable[[int], None] = lambda n: None,
    worker: dict | None = None,
    feed: FeedContext | None = None,
) -> ShardStats:
    """Tokenize ``shard`` into its output file and commit it with its stats (``feed``: the staged
    path's decode pool, device stage and device turns; None: the in-thread path)."""
    start = time.time()
    writer = ShardWriter(job.layout, shard.index, job.schema, job.manifest, job.storage_options, job.run_id)
    skipped: list[dict] = []
    rows_in = 0
    kept = KeptValues(job.schema.kept, job.schema.kept_types())
    columns = [f.source for f in job.schema.kept if f.json_type is None]
    qa = ShardQA(tok, job.qa_every, job.precision)  # QA (pipeline.qa)

    def finish_batch(good: list[DecodedImage], tokens: np.ndarray) -> list[DecodedImage]:
        qa.check(good, tokens)  # QA (pipeline.qa): reads tokens in shard order, never changes them
        good = kept.apply(good)
        if job.token_counts is not None:
            good = with_token_counts(tok, good, tokens, job.token_counts, job.precision)
        return good

    def on_batch(results: list) -> None:
        nonlocal rows_in
        rows_in += len(results)
        skipped.extend({"key": r.key, "reason": r.reason} for r in results if isinstance(r, SkippedRecord))
        on_progress(len(results))

    try:
        records = iter_records(shard, job.storage_options, columns, job.max_member_bytes)
        if feed is not None:
            feed_shard(feed, records, job.batch_size, job.transform, job.fast_decode, finish_batch,
                       writer.write, on_batch)
        else:
            _encode_in_thread(tok, records, job, finish_batch, writer.write, on_batch)
        stats = ShardStats(
            index=shard.index,
            shard=job.layout.shard_name(shard.index),
            input_url=redact_url(shard.url),
            input_bytes=shard.size,
            rows_in=rows_in,
            rows_written=writer.rows,
            skipped=skipped,
            run_fingerprint=job.run_fingerprint,
            seconds=round(time.time() - start, 3),
            worker=worker or {},
            kept_nulls=kept.nulls,
            run_id=job.run_id,
            batch_size=job.batch_size,
            device_type=(worker or {}).get("device_type", str(tok.device)),
            started_at=round(start, 3),
            finished_at=round(time.time(), 3),
            **qa.fields(),
        )
        qa.save_thumbnails(job.layout, shard.index, job.storage_options)  # QA: before the stats commit
        return writer.commit(stats)
    except BaseException:
        writer.abort()
        raise


def _encode_in_thread(tok: ImageTokenizer, records: Iterable[Record], job: ShardJob, finish_batch, write,
                      on_batch) -> None:
    """The in-thread path: decode on a thread pool one batch ahead of the device."""
    def decode(record: Record) -> DecodedImage | SkippedRecord:
        return decode_record(record, job.transform, fast=job.fast_decode)

    with ThreadPoolExecutor(max(1, job.decode_threads), thread_name_prefix="decode") as pool:
        ahead: list[Future] | None = None
        for batch in itertools.chain(_batches(records, job.batch_size), [None]):
            submitted = [pool.submit(decode, r) for r in batch] if batch is not None else None
            if ahead is not None:
                results = [f.result() for f in ahead]
                good = [r for r in results if isinstance(r, DecodedImage)]
                if good:
                    tokens = encode_views(tok, good, job.precision)
                    write(finish_batch(good, tokens), tokens)
                on_batch(results)
            ahead = submitted
