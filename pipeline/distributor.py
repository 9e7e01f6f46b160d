"""The driver: list shards, check the output, feed pending shards to encoder actors, reconcile.

Exactly-once output comes from three rules: one output file per input shard (named by its index),
atomic commits (data, then stats), and a ledger that treats a shard as done only when both agree.
A rerun therefore skips finished shards without reading them and redoes the rest; a failed shard
is retried on another actor; an actor that dies is replaced.
"""
from __future__ import annotations

import collections
import logging
import os
import time
from dataclasses import dataclass, field

import ray
from ray.exceptions import RayActorError, RayTaskError
from tqdm import tqdm

from tokenizer.checkpoint import read_checkpoint
from tokenizer.flextok.counts import TokenCountSettings
from tokenizer.transform import ImageTransform

from .actor import EncoderActor
from .card import write_card
from .encode import ShardJob
from .layout import OutputLayout
from .ledger import Ledger, ShardStats, redact_url
from .manifest import TokenizerInfo, build_manifest, prepare_output, run_fingerprint
from .plan import ActorPlan, plan_cluster
from .records import InputShard
from .schema import TokenSchema
from .sources import list_source

log = logging.getLogger("pretok")
PROGRESS_EVERY_S = 0.5  # how often the driver asks the actors for their image counts


@dataclass(frozen=True)
class PretokenizeConfig:
    input: str | tuple[str, ...]        # one INPUT or several (each may hold brace groups or be @list)
    output: str
    tokenizer: str
    format: str = "auto"
    split: str = "train"
    resolution: int | None = None       # default: the tokenizer's image size
    views: str = "center"
    batch_size: int = 64
    actors: int | None = None           # default: one per GPU share, or one per 4 CPUs without GPUs
    gpus_per_actor: float | None = None  # default: 1 when the cluster has GPUs, else 0 (CPU)
    cpus_per_actor: float | None = None  # default: the GPU nodes' CPUs per GPU (pipeline.plan)
    decode_workers: int | None = None   # default: one per whole CPU of the actor
    precision: str = "fp32"
    max_retries: int = 3
    images_per_shard: int = 1000        # imagefolder chunking
    keep: tuple[str, ...] = ()          # passthrough columns, FIELD[:TYPE] specs (comma lists allowed)
    keep_all_json: bool = False         # every field of the webdataset .json sidecars
    allow_missing: bool = False         # named shards that do not exist are recorded, not an error
    storage_options: dict | None = None
    overwrite: bool = False
    progress: bool = True
    # Per-image ``num_tokens_needed`` column (ordered tokenizers only); None: off.
    token_count_mse: float | None = None
    token_count_steps: int = 20
    token_count_guidance: float = 7.5
    token_count_seed: int = 0


@dataclass
class RunSummary:
    output: str
    split: str
    shards_total: int
    shards_skipped_done: int
    shards_written: int
    shards_failed: list[dict] = field(default_factory=list)
    shards_missing: int = 0
    rows_in: int = 0
    rows_written: int = 0
    rows_skipped: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.shards_failed

    def describe(self) -> str:
        rate = self.rows_in / self.seconds if self.seconds else 0.0
        lines = [
            f"output   {self.output} (split {self.split})",
            f"shards   {self.shards_total} total: {self.shards_skipped_done} already done, "
            f"{self.shards_written} written now, {len(self.shards_failed)} failed",
            f"rows     {self.rows_in} in = {self.rows_written} written + {self.rows_skipped} skipped (all done shards)",
            f"time     {self.seconds:.1f} s this run ({rate:.1f} img/s)",
        ]
        if self.shards_missing:
            lines.append(f"missing  {self.shards_missing} named input shards do not exist (listed in pretok.json)")
        lines += [f"FAILED   shard {f['index']}: {f['error']}" for f in self.shards_failed]
        return "\n".join(lines)


def _ensure_ray() -> bool:
    """Connect to RAY_ADDRESS or start a local cluster; True when this call started it."""
    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS") or "local"  # "local": never join a stray local cluster
    ray.init(address=address, include_dashboard=False if address == "local" else None,
             logging_level=logging.WARNING, log_to_driver=True)
    return True


class _Pool:
    """Encoder actors, replaced when they die."""

    def __init__(self, plan: ActorPlan, tokenizer: ray.ObjectRef, fingerprint: str, job: ShardJob):
        self.plan = plan
        self._args = (tokenizer, fingerprint, job, max(1, int(plan.cpus_per_actor)))
        self.actors = [self._new() for _ in range(plan.actors)]

    def _new(self):
        return EncoderActor.options(
            num_gpus=self.plan.gpus_per_actor, num_cpus=self.plan.cpus_per_actor, max_concurrency=2
        ).remote(*self._args)

    def replace(self, i: int) -> None:
        ray.kill(self.actors[i], no_restart=True)
        self.actors[i] = self._new()

    def started(self, i: int):
        """A ref that resolves once actor ``i`` is up (or has failed to start)."""
        return self.actors[i].info.remote()

    def progress(self, skip: set[int]) -> list[int | None]:
        """Images done per actor; None for one in ``skip`` (not started) or silent for 0.2 s."""
        refs = [None if i in skip else a.progress.remote() for i, a in enumerate(self.actors)]
        live = [r for r in refs if r is not None]
        ready, _ = ray.wait(live, num_returns=len(live), timeout=0.2)
        out: list[int | None] = []
        for r in refs:
            try:
                out.append(ray.get(r) if r in ready else None)
            except RayActorError:
                out.append(None)
        return out

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a, no_restart=True)


def run_pretokenize(cfg: PretokenizeConfig) -> RunSummary:
    """Run (or resume) one split; returns counts. Raises before writing anything on bad input."""
    start = time.time()
    so = cfg.storage_options
    ckpt = read_checkpoint(cfg.tokenizer, so)  # resolved and read once, here; actors get these bytes
    tok = TokenizerInfo.from_checkpoint(ckpt)
    resolution = cfg.resolution or tok.image_size
    if resolution != tok.image_size:
        raise ValueError(f"--resolution {resolution} does not match the tokenizer's image size {tok.image_size}")
    if cfg.precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be fp32 or bf16, not {cfg.precision!r}")
    token_counts = _token_count_settings(cfg, tok)
    transform = ImageTransform(resolution, cfg.views)
    listing = list_source(cfg.input, cfg.format, so, cfg.images_per_shard, cfg.keep, cfg.keep_all_json,
                          cfg.allow_missing)
    layout = OutputLayout(cfg.output, cfg.split, listing.num_shards)
    manifest = build_manifest(tok, transform, cfg.precision, listing, cfg.split,
                              token_counts.describe() if token_counts else None)
    manifest = prepare_output(layout, manifest, cfg.overwrite, so)
    fp = run_fingerprint(manifest, cfg.split)
    done = Ledger.read(layout, fp, so).done
    pending = [s for s in listing.shards if s.index not in done]
    summary = RunSummary(redact_url(cfg.output), cfg.split, len(listing.shards), len(done), 0,
                         shards_missing=len(listing.missing))
    if pending:
        schema = TokenSchema(
            tok.num_tokens, transform.num_views, listing.has_labels,
            tuple(listing.label_names) if listing.label_names else None, listing.has_captions,
            token_counts is not None, listing.kept,
        )
        started = _ensure_ray()
        try:
            plan = plan_cluster(cfg.actors, cfg.gpus_per_actor, cfg.cpus_per_actor, cfg.decode_workers)
            job = ShardJob(layout, schema, manifest, fp, transform, cfg.batch_size, cfg.precision,
                           plan.decode_workers, so, token_counts)
            new, failed = _distribute(pending, _Pool(plan, ray.put(ckpt), tok.fingerprint, job), cfg)
        finally:
            if started:
                ray.shutdown()
        done.update(new)
        summary.shards_written, summary.shards_failed = len(new), failed
    write_card(layout, manifest, done, so)
    for s in done.values():
        summary.rows_in += s.rows_in
        summary.rows_written += s.rows_written
        summary.rows_skipped += len(s.skipped)
    summary.seconds = time.time() - start
    return summary


def _token_count_settings(cfg: PretokenizeConfig, tok: TokenizerInfo) -> TokenCountSettings | None:
    if cfg.token_count_mse is None:
        return None
    if not tok.ordered:
        raise ValueError(
            f"--token-count-mse needs an ordered tokenizer (FlexTok), whose id prefixes decode to coarser "
            f"images; the {tok.family} tokenizer {tok.name!r} is not ordered"
        )
    return TokenCountSettings.for_num_tokens(
        tok.num_tokens, cfg.token_count_mse, timesteps=cfg.token_count_steps,
        guidance_scale=cfg.token_count_guidance, seed=cfg.token_count_seed,
    )


def _distribute(
    pending: list[InputShard], pool: _Pool, cfg: PretokenizeConfig
) -> tuple[dict[int, ShardStats], list[dict]]:
    queue = collections.deque(pending)
    attempts: collections.Counter[int] = collections.Counter()
    last_actor: dict[int, int] = {}
    inflight: dict = {}
    idle = list(range(len(pool.actors)))
    # A replacement actor gets shards once it is up: one with no room left (its node is gone) must
    # not hold a shard that the other actors could do.
    starting: dict = {}
    done: dict[int, ShardStats] = {}
    failed: list[dict] = []
    images = skipped = 0
    seen = [0] * len(pool.actors)
    bar = tqdm(total=len(pending), unit="shard", desc="pretokenize", disable=not cfg.progress, dynamic_ncols=True)
    t0 = polled = time.time()

    def take_for(actor: int) -> InputShard:
        for i, shard in enumerate(queue):  # prefer a shard that did not just fail on this actor
            if last_actor.get(shard.index) != actor or len(pool.actors) == 1:
                del queue[i]
                return shard
        return queue.popleft()

    def retry(shard: InputShard, actor: int, error: str) -> None:
        attempts[shard.index] += 1
        last_actor[shard.index] = actor
        if attempts[shard.index] <= cfg.max_retries:
            log.warning("shard %d failed (attempt %d), retrying on another actor: %s", shard.index, attempts[shard.index], error)
            queue.appendleft(shard)
        else:
            failed.append({"index": shard.index, "input": redact_url(shard.url), "error": error})

    try:
        while queue or inflight:
            while idle and queue:
                a = idle.pop(0)
                shard = take_for(a)
                inflight[pool.actors[a].run.remote(shard, attempts[shard.index] + 1)] = (a, shard)
            ready, _ = ray.wait([*inflight, *starting], num_returns=1, timeout=0.5)
            for ref in ready:
                if ref in starting:  # up, or failed to start: then its first shard fails and is retried
                    idle.append(starting.pop(ref))
                    continue
                a, shard = inflight.pop(ref)
                try:
                    stats = ray.get(ref)
                except RayActorError as e:
                    pool.replace(a)
                    seen[a] = 0
                    starting[pool.started(a)] = a
                    retry(shard, a, f"encoder actor died: {type(e).__name__}")
                    continue
                except RayTaskError as e:
                    retry(shard, a, f"{type(e.cause).__name__}: {e.cause}")
                else:
                    done[shard.index] = stats
                    skipped += len(stats.skipped)
                    bar.update(1)
                idle.append(a)
            if time.time() - polled < PROGRESS_EVERY_S:
                continue  # polling every actor after every shard would cost O(actors) per shard
            polled = time.time()
            for i, p in enumerate(pool.progress(set(starting.values()))):
                if p is not None:
                    images += max(0, p - seen[i])
                    seen[i] = p
            rate = images / max(1e-9, time.time() - t0)
            bar.set_postfix_str(f"{images} img, {rate:.1f} img/s, {skipped} skipped, {len(failed)} failed")
    finally:
        bar.close()
        pool.shutdown()
    return done, failed

