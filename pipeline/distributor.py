"""The driver: list shards, check the output, feed pending shards to encoder actors, reconcile.

Exactly-once output comes from three rules: one output file per input shard (named by its index),
atomic commits (data, then stats), and a ledger that treats a shard as done only when both agree.
A rerun therefore skips finished shards without reading them and redoes the rest. A run holds the
split's lease on the output (``pipeline.lease``); the actor pool (``pipeline.pool``) places and
replaces actors; ``pipeline.failures`` says what each failure costs the shard and the actor; the
driver checks every reported commit before counting the shard done.
"""
from __future__ import annotations

import collections
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import ray
from tqdm import tqdm

from tokenizer.checkpoint import Checkpoint, read_checkpoint
from tokenizer.flextok.counts import TokenCountSettings
from tokenizer.transform import ImageTransform

from .actor import EncoderActor
from .card import write_card
from .encode import ShardJob
from .failures import Kind, Verdict, classify, describe
from .layout import OutputLayout
from .lease import MANIFEST_WAIT_S, Lease, LeaseBusy, LeaseLost, live_leases, new_run_id
from .ledger import Ledger, ShardStats, check_commit, redact_url
from .manifest import TokenizerInfo, build_manifest, prepare_output, read_manifest, run_fingerprint
from .plan import plan_cluster
from .qa import DEFAULT_QA_EVERY, DEFAULT_QA_MIN_PSNR, QASummary
from .pool import ActorSpec, Event, Pool
from .records import InputShard, SourceListing
from .report import write_report
from .schema import TokenSchema
from .sources import list_source
from .sources.webdataset import DEFAULT_MAX_MEMBER_BYTES
from .staging import clean_shared_staging, clean_split_staging, list_names
from .urls import canonical_url, is_local

log = logging.getLogger("pretok")
SHARDS_IN_FLIGHT = 2  # per actor (staged path): the next shard reads and decodes while the last commits
PROBE_GRACE_S = 2.0  # how long the driver looks for an actor's probe file on a local output (NFS caches)


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
    decode_workers: int | None = None   # default: one per whole CPU of the actor; 0: threads in the actor
    precision: str = "fp32"
    fast_decode: bool = False           # JPEG DCT-domain downscaling of large originals (not exact)
    max_retries: int = 3                # charged failures of one shard before it fails for good
    images_per_shard: int = 1000        # imagefolder chunking
    keep: tuple[str, ...] = ()          # passthrough columns, FIELD[:TYPE] specs (comma lists allowed)
    keep_all_json: bool = False         # every field of the webdataset .json sidecars
    allow_missing: bool = False         # named shards that do not exist are recorded, not an error
    limit_shards: int | None = None     # trial run: only the first N shards of the listing (same layout)
    storage_options: dict | None = None
    overwrite: bool = False             # replace this split only
    overwrite_all: bool = False         # replace every split (the settings of all may change)
    verify: bool = False                # hash every done data file against its stats before resuming
    progress: bool = True
    # Per-image ``num_tokens_needed`` column (ordered tokenizers only); None: off.
    token_count_mse: float | None = None
    token_count_steps: int = 20
    token_count_guidance: float = 7.5
    token_count_seed: int = 0
    # Fault handling.
    placement_timeout_s: float = 300.0  # an actor not placed by then is dropped (all: the run fails)
    start_timeout_s: float = 900.0      # loading the tokenizer in an actor
    stall_timeout_s: float = 900.0      # a busy actor with no image done for this long is killed
    max_start_failures: int = 3         # actor start failures in a row that stop the run
    max_actor_failures: int = 2         # shard failures in a row after which an actor is replaced
    lease_wait_s: float = 0.0           # how long to wait for another run of this split
    lease_ttl_s: float = 60.0           # a lease without a heartbeat for this long is taken over
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES  # larger tar members are skipped
    # QA and report. Not run settings: they change the stats and the report, never the tokens.
    qa_every: int = DEFAULT_QA_EVERY    # decode every K-th written row of a shard back; 0 = off
    qa_min_psnr: float = DEFAULT_QA_MIN_PSNR  # a lower mean PSNR logs a warning
    report: bool = True                 # draw OUT/report/ at the end


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
    run_id: str = ""
    aborted: str | None = None          # why the run stopped before its queue was empty
    abort_is_config: bool = False       # ... because of the configuration (exit 2)
    unplaced: list[str] = field(default_factory=list)
    limit: int | None = None            # --limit-shards of this run
    qa: QASummary | None = None         # over all done shards
    qa_warning: str | None = None
    report: str | None = None           # the report folder, when drawn

    @property
    def ok(self) -> bool:
        return not self.shards_failed and self.aborted is None

    @property
    def exit_code(self) -> int:
        """0 done; 1 some shards failed or the run stopped (rerun to resume); 2 configuration."""
        if self.aborted is not None and self.abort_is_config:
            return 2
        return 0 if self.ok else 1

    def describe(self) -> str:
        rate = self.rows_in / self.seconds if self.seconds else 0.0
        left = self.shards_total - self.shards_skipped_done - self.shards_written - len(self.shards_failed)
        lines = [
            f"output   {self.output} (split {self.split}, run {self.run_id})",
            f"shards   {self.shards_total} total: {self.shards_skipped_done} already done, "
            f"{self.shards_written} written now, {len(self.shards_failed)} failed"
            + (f", {left} not done" if left else ""),
            f"rows     {self.rows_in} in = {self.rows_written} written + {self.rows_skipped} skipped (all done shards)",
            f"time     {self.seconds:.1f} s this run ({rate:.1f} img/s)",
        ]
        if self.limit is not None and self.limit < self.shards_total:
            lines.append(f"limit    --limit-shards {self.limit}: only the first {self.limit} "
                         f"of {self.shards_total} shards; the same command without it does the rest")
        if self.qa is not None:
            lines.append(f"qa       {self.qa.describe()}")
        if self.report:
            lines.append(f"report   {self.report} (plots of all done shards; linked from README.md)")
        if self.qa_warning:
            lines.append(self.qa_warning)
        if self.shards_missing:
            lines.append(f"missing  {self.shards_missing} named input shards do not exist (listed in pretok.json)")
        if self.unplaced:
            lines.append(f"UNPLACED {', '.join(self.unplaced)} (not enough free resources within the placement timeout)")
        lines += [f"FAILED   shard {f['index']}: {f['error']}" for f in self.shards_failed]
        if self.aborted:
            lines.append(f"STOPPED  {self.aborted}")
        return "\n".join(lines)


def ensure_ray() -> bool:
    """Connect to RAY_ADDRESS or start a local cluster; True when this call started it."""
    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS") or "local"  # "local": never join a stray local cluster
    try:
        ray.init(address=address, include_dashboard=False if address == "local" else None,
                 logging_level=logging.WARNING, log_to_driver=True)
    except Exception as e:  # noqa: BLE001 - any failure to reach Ray is one clear error
        raise RuntimeError(f"cannot start or reach the Ray cluster ({address}): {describe(e)}") from None
    return True


def _canonical_inputs(inputs: str | tuple[str, ...]) -> tuple[str, ...]:
    """Each INPUT canonicalised; an ``@list`` file's own URL too (its lines are URLs already)."""
    items = (inputs,) if isinstance(inputs, str) else inputs
    return tuple("@" + canonical_url(i[1:]) if i.startswith("@") else canonical_url(i) for i in items)


def _new_actor(tokenizer: ray.ObjectRef, fingerprint: str, job: ShardJob, threads: int, decode_workers: int,
               shards_in_flight: int):
    def make(options: dict):
        return EncoderActor.options(**options, max_concurrency=shards_in_flight + 1).remote(
            tokenizer, fingerprint, job, threads, decode_workers)
    return make


def _probe_check(root: str) -> Callable[[dict], str | None]:
    """For local output: the driver must see the probe file each actor wrote at start."""
    driver_node = ray.get_runtime_context().get_node_id()

    def check(identity: dict) -> str | None:
        probe = identity.get("probe")
        if probe is None:
            return None
        deadline = time.monotonic() + PROBE_GRACE_S  # NFS may cache a negative lookup briefly
        folder, name = os.path.split(probe)
        while not os.path.exists(probe) and name not in list_names(folder):  # a listing revalidates the folder
            if time.monotonic() > deadline:
                return (f"local output {root} is not shared by the cluster: a file the actor on node "
                        f"{identity.get('node_id', '?')[:12]} wrote there is not visible to the driver (node "
                        f"{driver_node[:12]}). Use a filesystem every node mounts at the same path, or s3://")
            time.sleep(0.1)
        os.unlink(probe)
        return None
    return check


def _lease(layout: OutputLayout, name: str, run_id: str, cfg: PretokenizeConfig, wait_s: float, what: str) -> Lease:
    return Lease(layout.root, name, run_id, cfg.storage_options, ttl_s=cfg.lease_ttl_s, wait_s=wait_s, what=what)


def _manifest_lease(layout: OutputLayout, run_id: str, cfg: PretokenizeConfig) -> Lease:
    return _lease(layout, "manifest", run_id, cfg, max(MANIFEST_WAIT_S, 2 * cfg.lease_ttl_s), "the manifest")


@dataclass(frozen=True)
class PreparedRun:
    """What the driver knows before it touches the output: checked tokenizer, listing, manifest."""

    cfg: PretokenizeConfig                  # with canonical input and output URLs
    ckpt: Checkpoint
    tok: TokenizerInfo
    transform: ImageTransform
    token_counts: TokenCountSettings | None
    listing: SourceListing
    layout: OutputLayout
    manifest: dict                          # as this run would start it (before merging the stored one)

    @property
    def selected(self) -> tuple[InputShard, ...]:
        """The shards this run may process: all, or the first ``limit_shards`` of the sorted listing."""
        limit = self.cfg.limit_shards
        return self.listing.shards if limit is None else self.listing.shards[:limit]


def prepare_run(cfg: PretokenizeConfig) -> PreparedRun:
    """Read and check the tokenizer, list the input and build the manifest; writes nothing."""
    cfg = replace(cfg, input=_canonical_inputs(cfg.input), output=canonical_url(cfg.output))
    if cfg.limit_shards is not None and cfg.limit_shards < 1:
        raise ValueError(f"--limit-shards must be >= 1, not {cfg.limit_shards}")
    so = cfg.storage_options
    ckpt = read_checkpoint(cfg.tokenizer, so)  # resolved and read once, here; actors get these bytes
    tok = TokenizerInfo.from_checkpoint(ckpt)
    resolution = cfg.resolution or tok.image_size
    if resolution != tok.image_size:
        raise ValueError(f"--resolution {resolution} does not match the tokenizer's image size {tok.image_size}")
    if cfg.qa_every < 0:
        raise ValueError(f"--qa-every must be >= 0 (0 = off), not {cfg.qa_every}")
    if cfg.precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be fp32 or bf16, not {cfg.precision!r}")
    token_counts = _token_count_settings(cfg, tok)
    transform = ImageTransform(resolution, cfg.views)
    listing = list_source(cfg.input, cfg.format, so, cfg.images_per_shard, cfg.keep, cfg.keep_all_json,
                          cfg.allow_missing)
    # The layout and manifest are those of the whole listing, whatever --limit-shards says, so a
    # trial run's shards keep their names and a later full run resumes from them.
    layout = OutputLayout(cfg.output, cfg.split, listing.num_shards)
    manifest = build_manifest(tok, transform, cfg.precision, listing, cfg.split,
                              token_counts.describe() if token_counts else None, cfg.fast_decode)
    return PreparedRun(cfg, ckpt, tok, transform, token_counts, listing, layout, manifest)


def run_pretokenize(cfg: PretokenizeConfig) -> RunSummary:
    """Run (or resume) one split; returns counts. Raises before writing anything on bad input."""
    start = time.time()
    prepared = prepare_run(cfg)
    cfg, ckpt, tok, transform = prepared.cfg, prepared.ckpt, prepared.tok, prepared.transform
    so, token_counts, listing, layout = cfg.storage_options, prepared.token_counts, prepared.listing, prepared.layout
    manifest = prepared.manifest
    run_id = new_run_id()
    with _lease(layout, f"split-{cfg.split}", run_id, cfg, cfg.lease_wait_s, f"split {cfg.split!r}") as lease:
        with _manifest_lease(layout, run_id, cfg):
            if cfg.overwrite_all and (busy := [i for i in live_leases(layout.root, so) if i.run_id != run_id]):
                raise LeaseBusy(f"--overwrite-all replaces every split of {redact_url(layout.root)}, but "
                                + "; ".join(f"{i.name} is being written by {i.describe(time.time())}" for i in busy))
            manifest = prepare_output(layout, manifest, cfg.overwrite, so, cfg.overwrite_all)
            clean_shared_staging(layout, so)
        clean_split_staging(layout, so)
        fp = run_fingerprint(manifest, cfg.split)
        ledger = Ledger.read(layout, fp, so, verify=cfg.verify)
        for index, why in sorted(ledger.redo.items()):
            log.warning("shard %d is redone: %s", index, why)
        done = ledger.done
        pending = [s for s in prepared.selected if s.index not in done]
        summary = RunSummary(redact_url(cfg.output), cfg.split, len(listing.shards), len(done), 0, run_id=run_id,
                             shards_missing=len(listing.missing), limit=cfg.limit_shards)
        if pending:
            job = ShardJob(layout, _schema(tok, transform, listing, token_counts), manifest, fp, transform,
                           cfg.batch_size, cfg.precision, 1, so, token_counts, run_id, cfg.max_member_bytes,
                           cfg.fast_decode, qa_every=cfg.qa_every)
            outcome = _encode(pending, cfg, ckpt, tok, job, lease)
            done.update(outcome.done)
            summary.shards_written, summary.shards_failed = len(outcome.done), outcome.failed
            summary.aborted, summary.abort_is_config = outcome.abort, outcome.abort_is_config
            summary.unplaced = outcome.unplaced
        if lease.lost is None:
            if cfg.report and done:
                try:
                    write_report(layout, manifest, done, so, cfg.qa_min_psnr)
                    summary.report = redact_url(layout.report_dir) + "/"
                except Exception as e:  # noqa: BLE001 - the shards are committed; the report is a view of them
                    log.warning("the run report could not be drawn (rerun `pretok inspect OUT`): %s", describe(e))
            with _manifest_lease(layout, run_id, cfg):
                write_card(layout, read_manifest(layout, so) or manifest, done, so)
    for s in done.values():
        summary.rows_in += s.rows_in
        summary.rows_written += s.rows_written
        summary.rows_skipped += len(s.skipped)
    summary.qa = QASummary.of(done.values())
    summary.qa_warning = summary.qa.warning(cfg.qa_min_psnr)
    if summary.qa_warning:
        log.warning("\n%s\n%s\n%s", "!" * 100, summary.qa_warning, "!" * 100)
    summary.seconds = time.time() - start
    return summary


def _schema(tok: TokenizerInfo, transform: ImageTransform, listing: SourceListing,
            token_counts: TokenCountSettings | None) -> TokenSchema:
    names = tuple(listing.label_names) if listing.label_names else None
    return TokenSchema(tok.num_tokens, transform.num_views, listing.has_labels, names, listing.has_captions,
                       token_counts is not None, listing.kept)


def _encode(pending: list[InputShard], cfg: PretokenizeConfig, ckpt: Checkpoint, tok: TokenizerInfo,
            job: ShardJob, lease: Lease) -> "_Outcome":
    """Size the actors, start the pool and distribute ``pending`` (on RAY_ADDRESS or a local cluster)."""
    started = ensure_ray()
    try:
        plan = plan_cluster(cfg.actors, cfg.gpus_per_actor, cfg.cpus_per_actor, cfg.decode_workers)
        threads = max(1, int(plan.cpus_per_actor))
        job = replace(job, decode_threads=threads)
        # the in-thread path (--decode-workers 0) runs one shard at a time, as before the staged path
        in_flight = SHARDS_IN_FLIGHT if plan.decode_workers > 0 else 1
        spec = ActorSpec(plan.actors, plan.gpus_per_actor, plan.cpus_per_actor, cfg.placement_timeout_s,
                         cfg.start_timeout_s, cfg.stall_timeout_s, cfg.max_start_failures, in_flight)
        root = job.layout.root
        check = _probe_check(root) if is_local(root) else (lambda identity: None)
        make = _new_actor(ray.put(ckpt), tok.fingerprint, job, threads, plan.decode_workers, in_flight)
        return _distribute(pending, Pool(spec, make, check), cfg,
                           lambda stats: _commit_problem(job.layout, stats, cfg.storage_options), lease)
    finally:
        if started:
            ray.shutdown()


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


@dataclass
class _Outcome:
    done: dict[int, ShardStats]
    failed: list[dict]
    abort: str | None
    abort_is_config: bool
    unplaced: list[str]


class _ShardBook:
    """Pending shards and their failures. A shard fails for good once more than ``max_retries``
    of its failures are charged; failures on an actor later replaced for failing are refunded
    (unless the shard failed on another device too)."""

    def __init__(self, pending: list[InputShard], max_retries: int):
        self.queue = collections.deque(pending)
        self.max_retries = max_retries
        self.history: dict[int, list[list]] = collections.defaultdict(list)  # [device, reason, charged]
        self.failed: dict[int, dict] = {}
        self.done: dict[int, ShardStats] = {}
        self._shards = {s.index: s for s in pending}

    def attempt(self, index: int) -> int:
        return len(self.history[index]) + 1

    def _charged(self, index: int) -> int:
        return sum(1 for _, _, charged in self.history[index] if charged)

    def _failures_on(self, index: int, device: str | None) -> int:
        return 0 if device is None else sum(1 for d, _, _ in self.history[index] if d == device)

    def take(self, device: str, rivals: list[str | None]) -> InputShard | None:
        """The next shard that has failed on ``device`` no more often than on any rival device
        (the other live slots'; None: not started yet, counts as fresh). A failed shard thus waits
        for another device, but never for one where it failed as often."""
        for i, shard in enumerate(self.queue):
            mine = self._failures_on(shard.index, device)
            if not rivals or mine <= min(self._failures_on(shard.index, d) for d in rivals):
                del self.queue[i]
                return shard
        return None

    def retry(self, shard: InputShard, device: str, reason: str, charged: bool) -> None:
        self.history[shard.index].append([device, reason, charged])
        if self._charged(shard.index) > self.max_retries:
            self.fail(shard, reason)
        else:
            log.warning("shard %d failed on %s (attempt %d), retrying: %s", shard.index, device,
                        len(self.history[shard.index]), reason)
            self.queue.appendleft(shard)

    def requeue(self, shard: InputShard) -> None:
        """Back to the front of the queue, nothing charged (its attempt was cut short elsewhere)."""
        self.queue.appendleft(shard)

    def fail(self, shard: InputShard, reason: str) -> None:
        self.failed[shard.index] = {"index": shard.index, "input": redact_url(shard.url), "error": reason,
                                    "attempts": max(1, len(self.history[shard.index]))}

    def refund(self, indices: list[int], device: str) -> None:
        for index in dict.fromkeys(indices):
            history = self.history[index]
            if any(d != device and charged for d, _, charged in history):
                continue  # it failed elsewhere too: the shard itself is suspect
            for record in history:
                record[2] = False
            if self.failed.pop(index, None) is not None:
                self.queue.appendleft(self._shards[index])

    def commit(self, stats: ShardStats) -> None:
        self.done[stats.index] = stats


def _commit_problem(layout: OutputLayout, stats: ShardStats, storage_options: dict | None) -> str | None:
    """Check from the driver that a reported commit is visible (retried briefly for NFS caches)."""
    problem = None
    for attempt in range(3):
        try:
            problem = check_commit(layout, stats, storage_options)
        except Exception as e:  # noqa: BLE001 - unreachable storage: the shard is redone
            problem = f"cannot check it: {describe(e)}"
        if problem is None:
            return None
        time.sleep(0.2 * (attempt + 1))
    return problem


def _distribute(pending: list[InputShard], pool: Pool, cfg: PretokenizeConfig,
                commit_problem: Callable[[ShardStats], str | None], lease: Lease | None = None) -> _Outcome:
    """Feed ``pending`` to the pool until every shard is done or failed, or the run must stop.
    ``commit_problem(stats)`` checks a reported commit from the driver (None: it is visible)."""
    book = _ShardBook(pending, cfg.max_retries)
    bar = tqdm(total=len(pending), unit="shard", desc="pretokenize", disable=not cfg.progress, dynamic_ncols=True)
    t0 = time.time()
    skipped = 0
    abort = None
    try:
        while book.queue or pool.busy():
            if lease is not None:
                lease.check()
            if pool.abort is not None:
                break
            if not pool.alive():
                abort = "no encoder actor left: " + (", ".join(pool.unplaced) + " could not be placed"
                                                     if pool.unplaced else "all were retired")
                break
            for slot in pool.with_room():
                while pool.has_room(slot) and (shard := book.take(slot.device, pool.rivals(slot))) is not None:
                    pool.assign(slot, shard, book.attempt(shard.index))
            for event in pool.wait(0.5):
                if _settle(event, book, pool, cfg, commit_problem):
                    skipped += len(event.value.skipped)
                    bar.update(1)
            rate = pool.images_done / max(1e-9, time.time() - t0)
            bar.set_postfix_str(f"{pool.images_done} img, {rate:.1f} img/s, {skipped} skipped, "
                                f"{len(book.failed)} failed", refresh=False)
    except LeaseLost as e:
        abort = str(e)
    finally:
        bar.close()
        pool.shutdown()
    abort_is_config = False
    if pool.abort is not None:
        abort, abort_is_config = pool.abort, pool.abort_is_config
    if pool.unplaced and pool.ever_started:
        log.warning("%s could not be placed (each asks %s); the run went on without them",
                    ", ".join(pool.unplaced), pool.spec.resources())
    return _Outcome(book.done, sorted(book.failed.values(), key=lambda f: f["index"]), abort, abort_is_config,
                    pool.unplaced)


def _settle(event: Event, book: _ShardBook, pool: Pool, cfg: PretokenizeConfig,
            commit_problem: Callable[[ShardStats], str | None]) -> bool:
    """Book one finished shard task; True when the shard is now done."""
    slot, shard = event.slot, event.shard
    if event.kind == "orphaned":
        log.warning("shard %d is redone: it was in flight on %s, replaced (%s)", shard.index, slot.describe(),
                    event.value)
        book.requeue(shard)
        return False
    if event.kind == "done":
        problem = commit_problem(event.value)
        if problem is None:
            book.commit(event.value)
            pool.committed(slot)
            return True
        verdict = Verdict(Kind.TASK, f"{slot.describe()} reported shard {shard.index} committed, but the driver "
                          f"sees: {problem}", True)
    else:
        verdict = classify(event.value)
    if verdict.kind is Kind.BAD_SHARD:
        log.warning("shard %d cannot be read, not retried: %s", shard.index, verdict.reason)
        book.fail(shard, verdict.reason)
        pool.release(slot)
        return False
    book.retry(shard, slot.device, verdict.reason, verdict.charge_shard)
    if verdict.kind in (Kind.DEVICE, Kind.ACTOR_LOST):
        pool.replace(slot, f"{verdict.kind.value}: {verdict.reason}")
    elif verdict.kind is Kind.TASK:
        slot.streak.append(shard.index)
        if len(slot.streak) >= cfg.max_actor_failures:
            book.refund(slot.streak, slot.device)
            pool.replace(slot, f"{len(slot.streak)} shards failed on it in a row (last: {verdict.reason})")
        else:
            pool.release(slot)
    else:
        pool.release(slot)
    return False
